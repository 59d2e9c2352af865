import { setLang, t } from "./i18n";

const params = new URLSearchParams(location.search);
setLang(params.get("lang") ?? "vi");
const url = params.get("url") ?? "";
document.getElementById("offline-title")!.textContent = t("offline.title");
document.getElementById("offline-body")!.textContent = t("offline.body", { url });
document.getElementById("retry")!.textContent = t("offline.retry");

// Try again by itself every 15 s, counting down.
let left = 15;
const auto = document.getElementById("offline-auto")!;
const tick = () => {
  auto.textContent = t("offline.auto", { s: left });
  if (left-- <= 0) {
    left = 15;
    location.href = "/portal-retry";
  }
};
tick();
setInterval(tick, 1000);
