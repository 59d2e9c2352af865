//! The site directory: which sites exist, what they are called and where they sit in the
//! administrative tree. The tree's depth is data: a province → district → commune file and a
//! province → commune file are both valid.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{Level, SiteId, SiteInfo};

/// The Nghệ An 2021 sample directory (province, its 21 district-level units, a few communes).
pub const SAMPLE_NGHE_AN_2021: &str = include_str!("../data/nghe-an-2021.toml");

/// One site as written in the directory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteEntry {
    pub id: SiteId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SiteId>,
    pub level: Level,
    /// Marks sample entries whose names are illustrative.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub example: bool,
    /// Enrollment secret the installer puts on the site's PC (SITE_KEY); lets the site get
    /// a token by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Role given on enrollment; default by level (province → chair, district → district,
    /// commune → commune).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::Role>,
}

impl SiteEntry {
    /// The role this site gets when it enrolls with its secret.
    pub fn enrollment_role(&self) -> crate::Role {
        self.role.unwrap_or(match self.level {
            Level::Province => crate::Role::Chair,
            Level::District => crate::Role::District,
            Level::Commune => crate::Role::Commune,
        })
    }
}

#[derive(Debug, Deserialize)]
struct DirectoryFile {
    #[serde(default)]
    site: Vec<SiteEntry>,
}

/// Why a directory file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("directory file is not valid TOML: {0}")]
    Syntax(String),
    #[error("site id {0:?} appears more than once")]
    DuplicateId(String),
    #[error("site id {0:?} is empty or has characters other than a-z, 0-9, '-', '_', '.'")]
    BadId(String),
    #[error("site {site:?} names parent {parent:?}, which is not in the directory")]
    UnknownParent { site: String, parent: String },
    #[error("site {0:?} is its own ancestor (the tree has a cycle)")]
    Cycle(String),
    #[error("the directory has no sites")]
    Empty,
}

/// A validated site tree.
#[derive(Debug, Clone)]
pub struct Directory {
    sites: BTreeMap<SiteId, SiteEntry>,
    order: Vec<SiteId>,
}

/// A site id is ASCII lower-case letters, digits, '-', '_' and '.', 1 to 64 bytes.
pub fn is_valid_site_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

impl Directory {
    /// Parses and validates a directory file.
    pub fn from_toml(text: &str) -> Result<Self, DirectoryError> {
        let file: DirectoryFile =
            toml::from_str(text).map_err(|e| DirectoryError::Syntax(e.to_string()))?;
        Self::from_entries(file.site)
    }

    /// The built-in Nghệ An sample.
    pub fn sample() -> Self {
        // The sample is part of the crate and covered by a unit test.
        Self::from_toml(SAMPLE_NGHE_AN_2021).expect("built-in sample directory is valid")
    }

    pub fn from_entries(entries: Vec<SiteEntry>) -> Result<Self, DirectoryError> {
        if entries.is_empty() {
            return Err(DirectoryError::Empty);
        }
        let mut sites = BTreeMap::new();
        let mut order = Vec::with_capacity(entries.len());
        for e in entries {
            if !is_valid_site_id(&e.id) {
                return Err(DirectoryError::BadId(e.id));
            }
            if sites.contains_key(&e.id) {
                return Err(DirectoryError::DuplicateId(e.id));
            }
            order.push(e.id.clone());
            sites.insert(e.id.clone(), e);
        }
        let dir = Directory { sites, order };
        for e in dir.sites.values() {
            if let Some(p) = &e.parent {
                if !dir.sites.contains_key(p) {
                    return Err(DirectoryError::UnknownParent {
                        site: e.id.clone(),
                        parent: p.clone(),
                    });
                }
            }
            // Walk up; a chain longer than the number of sites means a cycle.
            let mut seen = HashSet::new();
            let mut cur = Some(e.id.as_str());
            while let Some(id) = cur {
                if !seen.insert(id) {
                    return Err(DirectoryError::Cycle(e.id.clone()));
                }
                cur = dir.sites.get(id).and_then(|s| s.parent.as_deref());
            }
        }
        Ok(dir)
    }

    pub fn get(&self, id: &str) -> Option<&SiteEntry> {
        self.sites.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.sites.contains_key(id)
    }

    /// Sites in file order.
    pub fn iter(&self) -> impl Iterator<Item = &SiteEntry> {
        self.order.iter().map(move |id| &self.sites[id])
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Ancestors of `id` from the root down, excluding `id` itself.
    pub fn path(&self, id: &str) -> Vec<SiteId> {
        let mut path = Vec::new();
        let mut cur = self.sites.get(id).and_then(|s| s.parent.clone());
        while let Some(p) = cur {
            cur = self.sites.get(&p).and_then(|s| s.parent.clone());
            path.push(p);
        }
        path.reverse();
        path
    }

    /// The wire description of a site in the directory.
    pub fn site_info(&self, id: &str) -> Option<SiteInfo> {
        let e = self.sites.get(id)?;
        let path = self.path(id);
        let path_names = path
            .iter()
            .map(|a| {
                self.sites
                    .get(a)
                    .map_or_else(|| a.clone(), |s| s.name.clone())
            })
            .collect();
        Some(SiteInfo {
            id: e.id.clone(),
            name: e.name.clone(),
            level: e.level,
            path,
            path_names,
        })
    }

    /// Direct children of `id`, in file order.
    pub fn children<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a SiteEntry> + 'a {
        self.iter().filter(move |e| e.parent.as_deref() == Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_has_province_21_districts_and_communes() {
        let d = Directory::sample();
        let roots: Vec<_> = d.iter().filter(|e| e.parent.is_none()).collect();
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].level, Level::Province);
        let districts: Vec<_> = d.children(&roots[0].id).collect();
        assert_eq!(districts.len(), 21);
        assert!(districts.iter().all(|e| e.level == Level::District));
        let vinh = d.get("tp-vinh").unwrap();
        assert_eq!(vinh.name, "UBND thành phố Vinh");
        assert!(d.children("tp-vinh").count() >= 3);
        // The five units without commune service in 2021 have no communes in the sample.
        for id in [
            "con-cuong",
            "quy-hop",
            "quy-chau",
            "tx-cua-lo",
            "tx-hoang-mai",
        ] {
            assert!(d.contains(id), "{id}");
            assert_eq!(d.children(id).count(), 0, "{id}");
        }
        let c = d.children("tp-vinh").next().unwrap();
        assert_eq!(
            d.path(&c.id),
            vec!["nghe-an".to_string(), "tp-vinh".to_string()]
        );
    }

    #[test]
    fn two_level_tree_is_valid() {
        let d = Directory::from_toml(
            r#"
            [[site]]
            id = "p"
            name = "Tỉnh"
            level = "province"
            [[site]]
            id = "c1"
            name = "Xã 1"
            parent = "p"
            level = "commune"
            "#,
        )
        .unwrap();
        assert_eq!(d.path("c1"), vec!["p".to_string()]);
        assert_eq!(d.site_info("c1").unwrap().level, Level::Commune);
    }

    #[test]
    fn bad_directories_are_refused() {
        let dup = "[[site]]\nid='a'\nname='A'\nlevel='province'\n[[site]]\nid='a'\nname='B'\nlevel='commune'\n";
        assert_eq!(
            Directory::from_toml(dup).unwrap_err(),
            DirectoryError::DuplicateId("a".into())
        );
        let orphan = "[[site]]\nid='a'\nname='A'\nparent='x'\nlevel='commune'\n";
        assert!(matches!(
            Directory::from_toml(orphan).unwrap_err(),
            DirectoryError::UnknownParent { .. }
        ));
        let cycle = "[[site]]\nid='a'\nname='A'\nparent='b'\nlevel='commune'\n[[site]]\nid='b'\nname='B'\nparent='a'\nlevel='commune'\n";
        assert!(matches!(
            Directory::from_toml(cycle).unwrap_err(),
            DirectoryError::Cycle(_)
        ));
        let bad_id = "[[site]]\nid='Xã A'\nname='A'\nlevel='commune'\n";
        assert!(matches!(
            Directory::from_toml(bad_id).unwrap_err(),
            DirectoryError::BadId(_)
        ));
        assert!(matches!(
            Directory::from_toml("site = 3").unwrap_err(),
            DirectoryError::Syntax(_)
        ));
        assert_eq!(Directory::from_toml("").unwrap_err(), DirectoryError::Empty);
    }
}
