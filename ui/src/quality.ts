// The link quality indicator: the engine grades this site's link and each other site's
// every two seconds; these turn its figures into the words a person reads.
import { currentLang, t } from "./i18n";

export type Grade = "good" | "fair" | "poor";

export interface SiteQuality {
  site: string;
  recv_bps: number;
  audio_loss_pct: number | null;
  size: [number, number] | null;
  grade: Grade;
}

export interface Quality {
  rtt_ms: number | null;
  uplink_loss_pct: number | null;
  downlink_loss_pct: number | null;
  estimate_bps: number;
  send_bps: number;
  send_size: [number, number] | null;
  reduced: boolean;
  video_paused: boolean;
  grade: Grade;
  sites: SiteQuality[];
}

const kbps = (bps: number) => Math.round(bps / 1000);
/** A percentage, with the decimal comma Vietnamese writes. */
const pct = (p: number) => {
  const s = p < 10 ? p.toFixed(1) : Math.round(p).toString();
  return currentLang() === "vi" ? s.replace(".", ",") : s;
};

/** This site's link in one line: round trip, loss, what is sent and at which size. */
export function linkDetails(q: Quality, transport: string | null): string {
  const parts: string[] = [];
  if (q.rtt_ms !== null) parts.push(t("quality.rtt", { ms: Math.round(q.rtt_ms) }));
  if (q.uplink_loss_pct !== null) parts.push(t("quality.loss", { pct: pct(q.uplink_loss_pct) }));
  parts.push(t("quality.send", { kbps: kbps(q.send_bps) }));
  if (q.video_paused) parts.push(t("quality.paused"));
  else if (q.send_size) parts.push(`${q.send_size[0]}x${q.send_size[1]}`);
  if (transport) parts.push(transport.toUpperCase());
  return parts.join(" · ");
}

/** What arrives from one site, for its tile's tooltip. */
export function siteDetails(s: SiteQuality): string {
  const parts = [t("quality.recv", { kbps: kbps(s.recv_bps) })];
  if (s.audio_loss_pct !== null) parts.push(t("quality.soundLoss", { pct: pct(s.audio_loss_pct) }));
  if (s.size) parts.push(`${s.size[0]}x${s.size[1]}`);
  return `${t(`quality.${s.grade}`)} — ${parts.join(" · ")}`;
}
