//! The Covid-19 information portal, in a window of its own for offices whose browser is too
//! old to open it.
//!
//! Least privilege: the window is labelled `portal` and no capability names it, so a page in
//! it cannot call any of the app's commands (the e2e test makes the call and sees it
//! refused). Navigation stays on the portal's origin(s); any other link opens in the system
//! browser. When the portal cannot be reached the window shows the app's offline page with a
//! retry button; the button navigates to [`RETRY_PATH`], which this module intercepts (no IPC
//! is needed, so the offline page stays without privileges too).

use std::sync::Arc;
use std::time::Duration;

use tauri::webview::NewWindowResponse;
use tauri::{AppHandle, Manager, WebviewUrl, WebviewWindow, WebviewWindowBuilder};
use tracing::{info, warn};
use url::Url;

pub const LABEL: &str = "portal";
/// The offline page, bundled with the UI.
pub const OFFLINE_PAGE: &str = "portal-offline.html";
/// What the offline page's retry button navigates to.
pub const RETRY_PATH: &str = "/portal-retry";

/// What to do with a navigation inside the portal window.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Another site: open it in the system browser instead.
    External,
    /// The offline page's retry button.
    Retry,
    Refuse,
}

/// The origins the portal may show: the portal's own plus the configured extra ones.
pub fn allowed_origins(portal: &Url, extra: &[String]) -> Vec<url::Origin> {
    let mut v = vec![portal.origin()];
    v.extend(
        extra
            .iter()
            .filter_map(|s| Url::parse(s).ok())
            .map(|u| u.origin()),
    );
    v
}

/// Decides a navigation to `to`; `app_origin` is where the app's own pages come from.
pub fn decide(to: &Url, allowed: &[url::Origin], app_origin: &url::Origin) -> Decision {
    if &to.origin() == app_origin || is_app_page(to) {
        return if to.path() == RETRY_PATH {
            Decision::Retry
        } else if to.path() == format!("/{OFFLINE_PAGE}") {
            Decision::Allow
        } else {
            // The portal window never shows the meeting UI.
            Decision::Refuse
        };
    }
    if allowed.contains(&to.origin()) {
        return Decision::Allow;
    }
    match to.scheme() {
        "http" | "https" | "mailto" => Decision::External,
        // about:blank, data: and the like are how pages load frames; blob: too.
        "about" | "data" | "blob" => Decision::Allow,
        _ => Decision::Refuse,
    }
}

/// The app's own pages: `tauri://localhost` on Linux and macOS,
/// `http(s)://tauri.localhost` on Windows.
fn is_app_page(u: &Url) -> bool {
    u.scheme() == "tauri" || u.host_str() == Some("tauri.localhost")
}

/// Whether something answers at the portal's host and port (a TCP connect; the page itself
/// is then WebKit's business).
pub async fn reachable(portal: &Url) -> bool {
    let Some(host) = portal.host_str() else {
        return false;
    };
    let Some(port) = portal.port_or_known_default() else {
        return false;
    };
    let host = host.trim_matches(['[', ']']).to_string();
    matches!(
        tokio::time::timeout(
            Duration::from_secs(4),
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
}

fn offline_url(app: &AppHandle, portal: &Url, lang: &str) -> Url {
    let base = app_base(app);
    let mut u = base.join(OFFLINE_PAGE).expect("a relative path joins");
    u.query_pairs_mut()
        .append_pair("url", portal.as_str())
        .append_pair("lang", lang);
    u
}

/// The URL the app's own pages are served from on this platform.
fn app_base(app: &AppHandle) -> Url {
    app.get_webview_window("main")
        .and_then(|w| w.url().ok())
        .filter(|u| u.scheme() != "about")
        .unwrap_or_else(|| {
            let s = if cfg!(windows) {
                "http://tauri.localhost/"
            } else {
                "tauri://localhost/"
            };
            Url::parse(s).expect("a constant URL")
        })
}

/// Opens (or shows) the portal window at `portal`; the offline page if it is unreachable.
pub async fn open(
    app: AppHandle,
    portal: Url,
    extra: Vec<String>,
    lang: String,
) -> Result<(), String> {
    let up = reachable(&portal).await;
    let first = if up {
        portal.clone()
    } else {
        info!(%portal, "portal unreachable; showing the offline page");
        offline_url(&app, &portal, &lang)
    };
    let allowed = allowed_origins(&portal, &extra);
    if let Some(w) = app.get_webview_window(LABEL) {
        // The settings may have changed the portal since the window was built.
        if let Some(policy) = app.try_state::<Arc<Policy>>() {
            *policy.target.write().expect("lock poisoned") = Target {
                portal,
                allowed,
                lang,
            };
        }
        navigate(&w, first);
        let _ = w.show();
        let _ = w.set_focus();
        return Ok(());
    }
    let app_origin = app_base(&app).origin();
    let title = if lang == "en" {
        "Covid-19 information portal"
    } else {
        "Cổng thông tin Covid-19"
    };
    let policy = Arc::new(Policy {
        app: app.clone(),
        app_origin,
        target: std::sync::RwLock::new(Target {
            portal,
            allowed,
            lang,
        }),
    });
    app.manage(policy.clone());
    let (nav, popup) = (policy.clone(), policy);
    let first = if matches!(first.scheme(), "http" | "https") {
        WebviewUrl::External(first)
    } else {
        WebviewUrl::CustomProtocol(first)
    };
    WebviewWindowBuilder::new(&app, LABEL, first)
        .title(title)
        .inner_size(1100.0, 760.0)
        // Navigations (top level, and on Linux frames too) stay on the allowed origins;
        // nothing else loads, and nothing opens by itself.
        .on_navigation(move |to| nav.navigation(to, false))
        // A person's click on a link elsewhere becomes a new-window request (the script
        // below), which opens in the system browser; so do target=_blank and window.open.
        .on_new_window(move |to, _| {
            if popup.navigation(&to, true) {
                if let Some(w) = popup.app.get_webview_window(LABEL) {
                    navigate(&w, to);
                }
            }
            NewWindowResponse::Deny
        })
        .initialization_script(EXTERNAL_LINKS)
        .build()
        .map_err(|e| format!("Không mở được cửa sổ cổng thông tin: {e}"))?;
    Ok(())
}

/// In the portal page: a click on a link to another origin asks for a new window (which
/// the app sends to the system browser) instead of navigating.
const EXTERNAL_LINKS: &str = r#"
document.addEventListener('click', (e) => {
  const a = e.target && e.target.closest ? e.target.closest('a[href]') : null;
  if (!a) return;
  const u = new URL(a.href, location.href);
  if (u.origin !== location.origin && /^(https?|mailto):$/.test(u.protocol)) {
    e.preventDefault();
    window.open(u.href, '_blank');
  }
}, true);
"#;

/// Where the portal is now (settings may change it while the window lives).
struct Target {
    portal: Url,
    allowed: Vec<url::Origin>,
    lang: String,
}

/// What the portal window's navigation handlers need.
struct Policy {
    app: AppHandle,
    app_origin: url::Origin,
    target: std::sync::RwLock<Target>,
}

impl Policy {
    /// Whether the window may go to `to`; acts on the other outcomes. Only a person's
    /// request for a new window (`asked`) opens the system browser.
    fn navigation(&self, to: &Url, asked: bool) -> bool {
        let t = self.target.read().expect("lock poisoned");
        match decide(to, &t.allowed, &self.app_origin) {
            Decision::Allow => true,
            Decision::External if asked => {
                if let Err(e) = ::open::that_detached(to.as_str()) {
                    warn!(%to, "cannot open in the system browser: {e}");
                }
                false
            }
            Decision::External => {
                info!(%to, "portal window: another origin not loaded here");
                false
            }
            Decision::Retry => {
                let app = self.app.clone();
                let (portal, lang) = (t.portal.clone(), t.lang.clone());
                tauri::async_runtime::spawn(async move {
                    let target = if reachable(&portal).await {
                        portal
                    } else {
                        offline_url(&app, &portal, &lang)
                    };
                    if let Some(w) = app.get_webview_window(LABEL) {
                        navigate(&w, target);
                    }
                });
                false
            }
            Decision::Refuse => {
                warn!(%to, "portal window: navigation refused");
                false
            }
        }
    }
}

fn navigate(w: &WebviewWindow, to: Url) {
    if let Err(e) = w.navigate(to) {
        warn!("portal navigate: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn navigation_stays_on_the_portal_and_its_listed_origins() {
        let portal = u("https://covid19.nghean.gov.vn/tin-tuc");
        let allowed = allowed_origins(&portal, &["https://cdn.nghean.gov.vn".into()]);
        let app = u("tauri://localhost/").origin();
        let d = |s: &str| decide(&u(s), &allowed, &app);
        assert_eq!(
            d("https://covid19.nghean.gov.vn/thong-bao?id=3"),
            Decision::Allow
        );
        assert_eq!(d("https://cdn.nghean.gov.vn/a.pdf"), Decision::Allow);
        // Same host, other scheme or port: another origin.
        assert_eq!(d("http://covid19.nghean.gov.vn/"), Decision::External);
        assert_eq!(d("https://covid19.nghean.gov.vn:8443/"), Decision::External);
        assert_eq!(d("https://facebook.com/ubnd"), Decision::External);
        assert_eq!(d("mailto:so-y-te@nghean.gov.vn"), Decision::External);
        assert_eq!(d("file:///etc/passwd"), Decision::Refuse);
        // The app's own pages: only the offline page and its retry button.
        assert_eq!(d("tauri://localhost/index.html"), Decision::Refuse);
        assert_eq!(
            d("tauri://localhost/portal-offline.html?url=x&lang=vi"),
            Decision::Allow
        );
        // Only that page: any other path would be served the meeting UI.
        assert_eq!(
            d("tauri://localhost/x/portal-offline.html"),
            Decision::Refuse
        );
        assert_eq!(d("tauri://localhost/portal-retry"), Decision::Retry);
        assert_eq!(d("http://tauri.localhost/portal-retry"), Decision::Retry);
    }

    #[tokio::test]
    async fn reachability_is_a_connect_to_the_portal_port() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(reachable(&u(&format!("http://127.0.0.1:{port}/"))).await);
        drop(l);
        assert!(!reachable(&u(&format!("http://127.0.0.1:{port}/"))).await);
    }
}
