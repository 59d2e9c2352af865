// The app's window: first run / settings, the pre-join screen, the meeting.
import { Channel, invoke } from "@tauri-apps/api/core";
import { listen } from "@tauri-apps/api/event";
import { setLang, t, translate } from "./i18n";
import { buildTree, type Node, type Site } from "./roster";
import { parseFrame, TileRenderer } from "./video";
import { linkDetails, siteDetails, type Quality } from "./quality";

interface Settings {
  server?: string | null;
  site?: string | null;
  room?: string | null;
  language?: string | null;
  portal_url?: string | null;
  portal_origins?: string[];
  camera?: number | null;
  no_camera?: boolean | null;
  microphone?: string | null;
  speaker?: string | null;
}

interface AppView {
  settings: Settings;
  complete: boolean;
  room: string;
  language: string;
  autoJoin: boolean;
  enrolled: boolean;
  problems: string[];
  version: string;
  inCall: boolean;
}

interface Device {
  id: string;
  name: string;
}

interface Devices {
  cameras: Device[];
  microphones: Device[];
  speakers: Device[];
  problems: string[];
}

interface Hand {
  site: string;
  name?: string;
  place: number;
}

interface FloorState {
  mode: "open" | "chair_only" | "granted";
  granted: string[];
  muted: string[];
  spotlight: string | null;
  locked: boolean;
  you_may_speak: boolean;
}

type CallEvent =
  | { type: "joined"; you: Site; role: string; sites: Site[] }
  | { type: "site_joined"; site: Site }
  | { type: "site_left"; site: string }
  | { type: "media_connected" }
  | { type: "hands"; queue: Hand[]; total: number }
  | { type: "floor"; state: FloorState }
  | { type: "ask_unmute"; by: string }
  | { type: "roll_call"; entries: RollEntry[] }
  | { type: "status"; speaking: string[]; mic_dbfs: number; transport: string | null }
  | ({ type: "quality" } & Quality)
  | { type: "video_paused_for_link"; paused: boolean }
  | { type: "receive_video_paused_for_link"; paused: boolean }
  | { type: "notice"; message: string }
  | { type: "error"; message: string; fatal: boolean }
  | { type: "reconnecting"; reason: string }
  | { type: "reconnected"; after_ms: number }
  | { type: "ended"; reason: string };

interface RollEntry {
  site: string;
  name: string;
  status: "present" | "absent";
  connected: boolean;
  reason?: string | null;
}

/** A chair command as the server takes it (`action` plus its fields). */
type ChairCommand = { action: string } & Record<string, unknown>;

type PreviewEvent = { type: "level"; dbfs: number } | { type: "notice"; message: string };

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;

let view: AppView;
const sites = new Map<string, Site>();
let me: Site | null = null;
let hands: Hand[] = [];
let speaking = new Set<string>();
let floor: FloorState | null = null;
let muted = false;
let cameraOff = false;
/** Sound only both ways (the person chose it for a thin link). */
let soundOnly = false;
let cameraBeforeSoundOnly = false;
/** The transport of the media path, from the last status. */
let transport: string | null = null;
let handUp = false;
let layout: "gallery" | "speaker" = "gallery";
let inCall = false;
let role = "";
let roll: RollEntry[] = [];
/** Media came up (the event can arrive before `join` returns). */
let mediaUp = false;

// ---- screens -------------------------------------------------------------------------

function show(screen: "settings" | "prejoin" | "call"): void {
  for (const s of ["settings", "prejoin", "call"]) $(`screen-${s}`).hidden = s !== screen;
}

let progressTimer: ReturnType<typeof setTimeout> | undefined;

/// Shows a progress line; with `clearAfterMs`, takes it away then unless another came first.
function progress(text: string, clearAfterMs?: number): void {
  clearTimeout(progressTimer);
  progressTimer = undefined;
  $("progress").textContent = text;
  if (clearAfterMs !== undefined) progressTimer = setTimeout(() => progress(""), clearAfterMs);
}

function fail(message: string): void {
  $("error-text").textContent = message;
  const d = $<HTMLDialogElement>("error-dialog");
  if (!d.open) d.showModal();
}

function notice(message: string): void {
  const li = document.createElement("li");
  li.textContent = message;
  $("notices").append(li);
  if (inCall) {
    const b = $("banner");
    b.textContent = message;
    b.hidden = false;
    // Then back to what the banner says about the floor.
    setTimeout(renderFloor, 8000);
  }
}

/** Hides the quality pill (it shows again with the next figures). */
function clearQuality(): void {
  const q = $("quality");
  q.textContent = "";
  q.title = "";
  delete q.dataset.q;
}

// ---- pictures ------------------------------------------------------------------------

const tiles = new Map<string, { el: HTMLElement; r: TileRenderer; last: number }>();
const previewRenderer = new TileRenderer($<HTMLCanvasElement>("preview"));
const selfRenderer = new TileRenderer($<HTMLCanvasElement>("self-view"));

function tile(site: string): { el: HTMLElement; r: TileRenderer; last: number } {
  let t0 = tiles.get(site);
  if (!t0) {
    const el = document.createElement("div");
    el.className = "tile";
    el.dataset.site = site;
    const canvas = document.createElement("canvas");
    canvas.width = 640;
    canvas.height = 360;
    const label = document.createElement("span");
    label.className = "label";
    el.append(canvas, label);
    $("gallery").append(el);
    t0 = { el, r: new TileRenderer(canvas), last: 0 };
    tiles.set(site, t0);
    relabel();
  }
  return t0;
}

function dropTile(site: string): void {
  tiles.get(site)?.el.remove();
  tiles.delete(site);
  arrange();
}

/** A raised-hand icon (drawn, so it needs no emoji font; offices' PCs often have none). */
function handIcon(): SVGSVGElement {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "hand-icon");
  svg.setAttribute("aria-hidden", "true");
  const shapes: [number, number, number, number][] = [
    [6, 5, 2.6, 10], // fingers
    [9, 2.5, 2.6, 12],
    [12, 3, 2.6, 11],
    [15, 5, 2.6, 9],
    [6, 11, 11.6, 10], // palm
  ];
  for (const [x, y, w, h] of shapes) {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", String(x));
    r.setAttribute("y", String(y));
    r.setAttribute("width", String(w));
    r.setAttribute("height", String(h));
    r.setAttribute("rx", "1.3");
    svg.append(r);
  }
  const thumb = document.createElementNS(ns, "rect");
  thumb.setAttribute("x", "2.5");
  thumb.setAttribute("y", "11");
  thumb.setAttribute("width", "2.6");
  thumb.setAttribute("height", "7");
  thumb.setAttribute("rx", "1.3");
  thumb.setAttribute("transform", "rotate(-35 4 14)");
  svg.append(thumb);
  return svg;
}

function relabel(): void {
  for (const [id, x] of tiles) {
    const label = x.el.querySelector(".label")!;
    const hand = hands.find((h) => h.site === id);
    label.textContent = sites.get(id)?.name ?? id;
    if (hand) label.append(" ", handIcon());
    x.el.classList.toggle("speaking", speaking.has(id));
  }
  arrange();
}

function arrange(): void {
  const g = $("gallery");
  g.dataset.layout = layout;
  g.dataset.count = String(tiles.size);
  $("alone").hidden = tiles.size > 0 || sites.size > 0;
  // Speaker view: the floor holder, else whoever speaks, else the first tile, in front.
  let main: string | undefined;
  if (layout === "speaker") {
    const first = [floor?.spotlight ?? "", ...(floor?.granted ?? []), ...speaking];
    main = first.find((s) => tiles.has(s)) ?? [...tiles.keys()][0];
  }
  for (const [id, x] of tiles) x.el.classList.toggle("main", id === main);
}

function onFrame(buf: ArrayBuffer): void {
  const p = parseFrame(buf);
  if (!p) return;
  if (p.kind === "self") {
    (inCall ? selfRenderer : previewRenderer).draw(p);
    return;
  }
  const x = tile(p.site);
  x.r.draw(p);
  x.last = performance.now();
  x.el.classList.remove("stale");
}

/**
 * A fresh channel for every preview and every call: a Tauri channel numbers its messages
 * from zero on the Rust side each time it is passed to a command, and the JavaScript side
 * delivers them only in that order.
 */
function frameChannel(): Channel<ArrayBuffer> {
  const ch = new Channel<ArrayBuffer>();
  ch.onmessage = onFrame;
  return ch;
}

// A tile with no picture for 3 s says so.
setInterval(() => {
  const now = performance.now();
  for (const x of tiles.values()) x.el.classList.toggle("stale", now - x.last > 3000);
}, 1000);

// ---- roster --------------------------------------------------------------------------

function renderRoster(): void {
  const all = [...sites.values()];
  if (me) all.push(me);
  $("roster-title").textContent = t("roster.title", { count: all.length });
  const root = $("roster");
  root.replaceChildren(...buildTree(all).map(renderNode));
}

function renderNode(n: Node): HTMLElement {
  const li = document.createElement("div");
  li.className = `node level-${n.level}` + (n.present ? " present" : " absent");
  li.dataset.site = n.id;
  const row = document.createElement("div");
  row.className = "row-site";
  const name = document.createElement("span");
  name.textContent = n.name + (me && n.id === me.id ? ` (${t("call.you")})` : "");
  row.append(name);
  const hand = hands.find((h) => h.site === n.id);
  if (hand) {
    const h = document.createElement("span");
    h.className = "hand";
    h.title = t("roster.hand");
    h.append(handIcon(), ` ${hand.place}`);
    row.append(h);
  }
  if (speaking.has(n.id)) {
    const s = document.createElement("span");
    s.className = "speaking-dot";
    s.title = t("roster.speaking");
    row.append(s);
  }
  if (role === "chair" && n.present && me && n.id !== me.id) row.append(chairActions(n.id, n.name));
  li.append(row);
  if (n.children.length) {
    const kids = document.createElement("div");
    kids.className = "children";
    kids.append(...n.children.map(renderNode));
    li.append(kids);
  }
  return li;
}

// ---- the chair's view ----------------------------------------------------------------

async function chairCmd(command: ChairCommand): Promise<string | null> {
  try {
    return await invoke<string | null>("chair", { command });
  } catch (e) {
    fail(String(e));
    return null;
  }
}

function button(label: string, onclick: () => void, cls = ""): HTMLButtonElement {
  const b = document.createElement("button");
  b.textContent = label;
  b.className = cls;
  b.onclick = onclick;
  return b;
}

/** What the chair can do to one site, from the roster. */
function chairActions(site: string, name: string): HTMLElement {
  const box = document.createElement("span");
  box.className = "chair-actions";
  box.append(
    button(t("chair.askUnmute"), () => void chairCmd({ action: "ask_unmute", site }), "mini"),
    button(t("chair.mute"), () => void chairCmd({ action: "mute", site }), "mini"),
    button(
      t("chair.spotlight"),
      () => void chairCmd({ action: "spotlight", site: floor?.spotlight === site ? null : site }),
      "mini",
    ),
    button(
      t("chair.remove"),
      () => {
        if (confirm(t("chair.confirmRemove", { site: name }))) void chairCmd({ action: "remove", site });
      },
      "mini danger",
    ),
  );
  return box;
}

function siteName(id: string): string {
  return sites.get(id)?.name ?? hands.find((h) => h.site === id)?.name ?? id;
}

function renderChair(): void {
  const isChair = role === "chair";
  $("chair-panel").hidden = !isChair;
  if (!isChair) return;
  $<HTMLSelectElement>("floor-mode").value = floor?.mode ?? "open";
  // What the server last confirmed (the select may show a choice still on its way).
  $("chair-panel").dataset.mode = floor?.mode ?? "open";
  $("lock-room").textContent = floor?.locked ? t("chair.unlock") : t("chair.lock");
  const list = $("chair-hands");
  if (!hands.length) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = t("chair.noHands");
    list.replaceChildren(li);
  } else {
    list.replaceChildren(
      ...hands.map((h) => {
        const li = document.createElement("li");
        li.dataset.site = h.site;
        const name = document.createElement("span");
        name.textContent = h.name || h.site;
        li.append(
          name,
          button(t("chair.grant"), () => void chairCmd({ action: "grant", site: h.site }), "mini primary grant"),
          button(t("chair.lowerHand"), () => void chairCmd({ action: "lower_hand", site: h.site }), "mini"),
        );
        return li;
      }),
    );
  }
  const granted = floor?.granted ?? [];
  const g = $("chair-granted");
  g.replaceChildren();
  if (granted.length) {
    const label = document.createElement("span");
    label.textContent = t("chair.granted");
    g.append(label);
    for (const site of granted) {
      const item = document.createElement("span");
      item.className = "granted";
      item.dataset.site = site;
      item.append(
        ` ${siteName(site)} `,
        button(t("chair.revoke"), () => void chairCmd({ action: "revoke", site }), "mini"),
      );
      g.append(item);
    }
  }
  renderRoll();
  $("roll-summary").textContent = roll.length
    ? t("chair.rollSummary", {
        present: roll.filter((r) => r.status === "present").length,
        connected: roll.filter((r) => r.connected).length,
        total: roll.length,
      })
    : "";
}

/** The roll-call, site by site: present, or absent with the reason the chair types. */
function renderRoll(): void {
  $("roll-details").hidden = roll.length === 0;
  const list = $("roll-list");
  // Keep a reason being typed: redraw only the rows whose entry changed.
  const rows = new Map([...list.children].map((li) => [(li as HTMLElement).dataset.site!, li as HTMLElement]));
  const fresh = roll.map((r) => {
    const key = `${r.status}|${r.connected}|${r.reason ?? ""}`;
    const old = rows.get(r.site);
    if (old && old.dataset.key === key) return old;
    const li = document.createElement("li");
    li.dataset.site = r.site;
    li.dataset.key = key;
    li.className = r.status;
    const name = document.createElement("span");
    name.textContent = r.name + (r.connected ? ` (${t("chair.connected")})` : "");
    const status = document.createElement("strong");
    status.textContent = r.status === "present" ? t("chair.present") : t("chair.absent");
    const reason = document.createElement("input");
    reason.placeholder = t("chair.reason");
    reason.value = r.reason ?? "";
    li.append(
      status,
      " ",
      name,
      button(t("chair.present"), () => void chairCmd({ action: "roll_call_mark", site: r.site, present: true }), "mini"),
      reason,
      button(
        t("chair.saveReason"),
        () =>
          void chairCmd({
            action: "roll_call_mark",
            site: r.site,
            present: false,
            reason: reason.value.trim() || null,
          }),
        "mini",
      ),
    );
    return li;
  });
  list.replaceChildren(...fresh);
}

$("floor-mode").onchange = () =>
  void chairCmd({ action: "floor_mode", mode: $<HTMLSelectElement>("floor-mode").value });
$("mute-all").onclick = () => void chairCmd({ action: "mute_all" });
$("lower-all").onclick = () => void chairCmd({ action: "lower_all" });
$("lock-room").onclick = () => void chairCmd({ action: "lock", locked: !floor?.locked });
$("roll-start").onclick = () => void chairCmd({ action: "roll_call_start" });
$("roll-export").onclick = async () => {
  const path = await chairCmd({ action: "roll_call_export" });
  if (path) notice(t("chair.rollSaved", { path }));
};

// ---- controls ------------------------------------------------------------------------

function renderControls(): void {
  $("mute").textContent = muted ? t("call.unmute") : t("call.mute");
  $("mute").classList.toggle("off", muted);
  $("camera").textContent = cameraOff ? t("call.cameraOn") : t("call.cameraOff");
  $("camera").classList.toggle("off", cameraOff);
  $("camera").toggleAttribute("disabled", soundOnly);
  $("sound-only").textContent = soundOnly ? t("call.soundAndVideo") : t("call.soundOnly");
  $("sound-only").classList.toggle("active", soundOnly);
  $("raise").textContent = handUp ? t("call.lower") : t("call.raise");
  // The chair gives the floor; it does not ask for it.
  $("raise").hidden = role === "chair";
  $("raise").classList.toggle("active", handUp);
  $("layout").textContent = layout === "gallery" ? t("call.speaker") : t("call.gallery");
}

function renderFloor(): void {
  const b = $("banner");
  const mine = me ? hands.find((h) => h.site === me!.id) : undefined;
  const granted = floor?.granted ?? [];
  if (floor && floor.mode !== "open" && floor.you_may_speak) {
    b.textContent = t("call.floorYou");
    b.hidden = false;
  } else if (me && floor?.muted.includes(me.id)) {
    b.textContent = t("call.mutedByChair");
    b.hidden = false;
  } else if (mine) {
    b.textContent = t("call.handPlace", { place: mine.place });
    b.hidden = false;
  } else if (granted.length) {
    b.textContent = t("call.floorOther", { site: granted.map((s) => sites.get(s)?.name ?? s).join(", ") });
    b.hidden = false;
  } else {
    b.hidden = true;
  }
}

async function act(cmd: string, args: Record<string, unknown> = {}): Promise<boolean> {
  try {
    await invoke(cmd, args);
    return true;
  } catch (e) {
    fail(String(e));
    return false;
  }
}

$("mute").onclick = async () => {
  const want = !muted;
  if (await act("set_mic_muted", { muted: want })) muted = want;
  renderControls();
};
$("camera").onclick = async () => {
  const want = !cameraOff;
  if (await act("set_camera_off", { off: want })) cameraOff = want;
  $("self-tile").classList.toggle("off", cameraOff);
  renderControls();
};
$("sound-only").onclick = async () => {
  const want = !soundOnly;
  // Sound only turns the camera off; ending it gives back what the person had chosen.
  const camera = want ? true : cameraBeforeSoundOnly;
  if (await act("set_sound_only", { on: want, cameraOff: camera })) {
    if (want) cameraBeforeSoundOnly = cameraOff;
    soundOnly = want;
    cameraOff = camera;
    if (want) notice(t("call.soundOnlyOn"));
  }
  $("self-tile").classList.toggle("off", cameraOff);
  renderControls();
};
$("raise").onclick = async () => {
  // Set, not toggled: the server's hand queue may arrive before the command returns.
  const up = !handUp;
  if (await act(up ? "raise_hand" : "lower_hand")) handUp = up;
  renderControls();
};
$("layout").onclick = () => {
  layout = layout === "gallery" ? "speaker" : "gallery";
  renderControls();
  arrange();
};
$("leave").onclick = async () => {
  await act("leave");
  endCall();
};
$("ask-accept").onclick = async () => {
  $<HTMLDialogElement>("ask-unmute").close();
  if (await act("reply_unmute", { accept: true })) muted = false;
  renderControls();
};
$("ask-decline").onclick = async () => {
  $<HTMLDialogElement>("ask-unmute").close();
  await act("reply_unmute", { accept: false });
};
$("error-close").onclick = () => $<HTMLDialogElement>("error-dialog").close();
for (const id of ["open-portal", "call-portal"]) $(id).onclick = () => act("open_portal");
$("export-diag").onclick = async () => {
  try {
    const path = await invoke<string>("export_diagnostics");
    notice(t("prejoin.diagnosticsSaved", { path }));
  } catch (e) {
    fail(String(e));
  }
};

// ---- events from the engine ----------------------------------------------------------

function onCall(e: CallEvent): void {
  switch (e.type) {
    case "joined":
      me = e.you;
      role = e.role;
      renderControls();
      sites.clear();
      for (const s of e.sites) if (s.id !== e.you.id) sites.set(s.id, s);
      $("where").textContent = `${e.you.name} · ${view.room}`;
      break;
    case "site_joined":
      if (!me || e.site.id !== me.id) sites.set(e.site.id, e.site);
      break;
    case "site_left":
      sites.delete(e.site);
      dropTile(e.site);
      break;
    case "media_connected":
      mediaUp = true;
      progress(t("join.connected"), 3000);
      break;
    case "hands":
      hands = e.queue;
      handUp = !!me && hands.some((h) => h.site === me!.id);
      renderControls();
      renderFloor();
      break;
    case "floor":
      floor = e.state;
      renderFloor();
      break;
    case "roll_call":
      roll = e.entries;
      break;
    case "ask_unmute":
      $<HTMLDialogElement>("ask-unmute").showModal();
      return;
    case "status": {
      const now = new Set(e.speaking);
      const changed = now.size !== speaking.size || [...now].some((s) => !speaking.has(s));
      speaking = now;
      transport = e.transport;
      if (!changed) return;
      break;
    }
    case "quality": {
      if (!inCall) return;
      const q = $("quality");
      q.dataset.q = e.grade;
      q.textContent = t(`quality.${e.grade}`);
      q.title = linkDetails(e, transport);
      for (const s of e.sites) {
        const x = tiles.get(s.site);
        if (!x) continue;
        x.el.dataset.q = s.grade;
        x.el.title = siteDetails(s);
      }
      return;
    }
    case "video_paused_for_link":
      notice(t(e.paused ? "call.videoPausedForLink" : "call.videoBackForLink"));
      return;
    case "receive_video_paused_for_link":
      notice(t(e.paused ? "call.receivePausedForLink" : "call.receiveBackForLink"));
      return;
    case "reconnecting":
      // The engine joins again by itself; the pictures resume when it is back. The last
      // quality figures no longer hold.
      progress(t("join.reconnecting"));
      clearQuality();
      return;
    case "reconnected":
      progress(t("join.reconnected"), 3000);
      return;
    case "notice":
      notice(e.message);
      return;
    case "error":
      fail(e.message);
      if (!e.fatal) return;
      endCall();
      return;
    case "ended":
      if (inCall) fail(e.reason);
      endCall();
      return;
  }
  relabel();
  renderRoster();
  renderChair();
}

// ---- joining -------------------------------------------------------------------------

async function join(): Promise<void> {
  const btn = $<HTMLButtonElement>("join");
  btn.disabled = true;
  progress(t("join.connecting"));
  mediaUp = false;
  try {
    await invoke("join", { frames: frameChannel() });
    inCall = true;
    muted = cameraOff = handUp = soundOnly = false;
    speaking = new Set();
    $("self-tile").classList.remove("off");
    show("call");
    renderControls();
    renderRoster();
    arrange();
    if (!mediaUp) progress(t("join.media"));
  } catch (e) {
    progress("");
    fail(String(e));
    await startPreview();
  } finally {
    btn.disabled = false;
  }
}

function endCall(): void {
  if (!inCall) return;
  inCall = false;
  for (const id of [...tiles.keys()]) dropTile(id);
  sites.clear();
  hands = [];
  floor = null;
  me = null;
  role = "";
  roll = [];
  renderChair();
  $("where").textContent = "";
  clearQuality();
  transport = null;
  progress(t("call.ended"));
  show("prejoin");
  void startPreview();
}

async function startPreview(): Promise<void> {
  try {
    await invoke("start_preview", { frames: frameChannel() });
  } catch (e) {
    notice(String(e));
  }
}

listen<CallEvent>("call", (ev) => onCall(ev.payload));
listen<PreviewEvent>("preview", (ev) => {
  const e = ev.payload;
  if (e.type === "level") {
    // -60 dBFS → empty, 0 dBFS → full.
    const pct = Math.max(0, Math.min(100, ((e.dbfs + 60) / 60) * 100));
    $("meter-fill").style.width = `${pct}%`;
  } else {
    notice(e.message);
  }
});

// ---- settings and devices ------------------------------------------------------------

function fillSettings(s: Settings): void {
  $<HTMLInputElement>("s-server").value = s.server ?? "";
  $<HTMLInputElement>("s-site").value = s.site ?? "";
  $<HTMLInputElement>("s-room").value = s.room ?? "";
  $<HTMLInputElement>("s-portal").value = s.portal_url ?? "";
  $<HTMLSelectElement>("s-lang").value = s.language ?? "vi";
}

function openSettings(firstRun: boolean): void {
  fillSettings(view.settings);
  $("settings-heading").textContent = firstRun ? t("firstRun.title") : t("settings.title");
  $("settings-lead").hidden = !firstRun;
  $("settings-close").hidden = firstRun;
  show("settings");
}

async function save(partial: Partial<Settings>): Promise<boolean> {
  try {
    view = await invoke<AppView>("save_settings", { settings: { ...view.settings, ...partial } });
    return true;
  } catch (e) {
    fail(String(e));
    return false;
  }
}

$("settings-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const val = (id: string) => $<HTMLInputElement>(id).value.trim() || null;
  const ok = await save({
    server: val("s-server"),
    site: val("s-site"),
    room: val("s-room"),
    portal_url: val("s-portal"),
    language: $<HTMLSelectElement>("s-lang").value,
  });
  if (ok) {
    setLang(view.language);
    translate();
    await enterPrejoin();
  }
};
$("settings-close").onclick = () => void enterPrejoin();
$("open-settings").onclick = () => openSettings(false);

function fillSelect(id: string, items: Device[], current: string | null | undefined, extra: Device[]): void {
  const sel = $<HTMLSelectElement>(id);
  sel.replaceChildren(
    ...[...extra, ...items].map((d) => {
      const o = document.createElement("option");
      o.value = d.id;
      o.textContent = d.name;
      return o;
    }),
  );
  sel.value = current ?? extra[0]?.id ?? "";
}

async function loadDevices(): Promise<void> {
  const d = await invoke<Devices>("list_devices");
  d.problems.forEach(notice);
  const s = view.settings;
  const def = { id: "", name: t("prejoin.default") };
  fillSelect("d-camera", d.cameras, s.no_camera ? "none" : String(s.camera ?? d.cameras[0]?.id ?? ""), [
    ...(d.cameras.length ? [] : [def]),
    { id: "none", name: t("prejoin.noCamera") },
  ]);
  fillSelect("d-mic", d.microphones, s.microphone, [def]);
  fillSelect("d-speaker", d.speakers, s.speaker, [def]);
}

// Device choices are remembered (per user) and the preview restarts on the new device.
$("d-camera").onchange = async () => {
  const v = $<HTMLSelectElement>("d-camera").value;
  await save({ no_camera: v === "none" ? true : null, camera: v === "none" || v === "" ? null : Number(v) });
  await startPreview();
};
$("d-mic").onchange = async () => {
  await save({ microphone: $<HTMLSelectElement>("d-mic").value || null });
  await startPreview();
};
$("d-speaker").onchange = () => void save({ speaker: $<HTMLSelectElement>("d-speaker").value || null });

async function enterPrejoin(): Promise<void> {
  $("prejoin-site").textContent = t("prejoin.site", { site: view.settings.site ?? "" });
  $("prejoin-room").textContent = t("prejoin.room", { room: view.room });
  $<HTMLButtonElement>("open-portal").hidden = !view.settings.portal_url;
  $<HTMLButtonElement>("call-portal").hidden = !view.settings.portal_url;
  show("prejoin");
  await startPreview();
  loadDevices().catch((e) => notice(String(e)));
}

$("join").onclick = () => void join();

async function start(): Promise<void> {
  view = await invoke<AppView>("app_state");
  setLang(view.language);
  translate();
  renderControls();
  view.problems.forEach(notice);
  if (!view.complete) {
    openSettings(true);
    return;
  }
  await enterPrejoin();
  if (view.autoJoin) await join();
}

start().catch((e) => fail(String(e)));
