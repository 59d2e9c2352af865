import { describe, expect, it } from "vitest";
import vi from "../src/locales/vi.json";
import en from "../src/locales/en.json";
import { buildTree, readable } from "../src/roster";
import { i420ToRgba, parseFrame } from "../src/video";
import { linkDetails, siteDetails, type Quality } from "../src/quality";
import { setLang } from "../src/i18n";

function frame(w: number, h: number, site: string, kind = 1): ArrayBuffer {
  const id = new TextEncoder().encode(site);
  const b = new Uint8Array(7 + id.length + (w * h * 3) / 2);
  b.set([1, kind, w & 255, w >> 8, h & 255, h >> 8, id.length]);
  b.set(id, 7);
  b.fill(235, 7 + id.length, 7 + id.length + w * h); // white luma
  b.fill(128, 7 + id.length + w * h); // neutral chroma
  return b.buffer;
}

describe("frame messages", () => {
  it("parse header, site and planes", () => {
    const p = parseFrame(frame(640, 360, "xa-a"))!;
    expect(p.kind).toBe("remote");
    expect(p.site).toBe("xa-a");
    expect([p.width, p.height]).toEqual([640, 360]);
    expect(p.y.length).toBe(640 * 360);
    expect(p.u.length).toBe(320 * 180);
    expect(p.v[0]).toBe(128);
    expect(parseFrame(frame(4, 2, "", 0))!.kind).toBe("self");
  });

  it("refuse malformed messages instead of throwing", () => {
    expect(parseFrame(new ArrayBuffer(3))).toBeNull();
    const short = frame(640, 360, "xa-a").slice(0, 1000);
    expect(parseFrame(short)).toBeNull();
    const bad = new Uint8Array(frame(4, 2, "x"));
    bad[0] = 9;
    expect(parseFrame(bad.buffer)).toBeNull();
  });

  it("convert limited-range white and black to RGB", () => {
    const p = parseFrame(frame(2, 2, ""))!;
    const out = new Uint8ClampedArray(16);
    i420ToRgba(p, out);
    expect([out[0], out[1], out[2], out[3]]).toEqual([255, 255, 255, 255]);
    p.y.fill(16);
    i420ToRgba(p, out);
    expect([out[0], out[1], out[2]]).toEqual([0, 0, 0]);
  });
});

describe("roster tree", () => {
  const sites = [
    { id: "nam-dan-kim-lien", name: "Xã Kim Liên", level: "commune", path: ["nghe-an", "nam-dan"] },
    { id: "nghe-an", name: "UBND tỉnh Nghệ An", level: "province", path: [] },
    { id: "nam-dan-xuan-hoa", name: "Xã Xuân Hòa", level: "commune", path: ["nghe-an", "nam-dan"] },
    { id: "tp-vinh", name: "TP Vinh", level: "district", path: ["nghe-an"] },
  ];

  it("groups communes under their district under the province", () => {
    const [root, ...rest] = buildTree(sites);
    expect(rest).toEqual([]);
    expect(root.id).toBe("nghe-an");
    expect(root.present).toBe(true);
    const district = root.children.find((c) => c.id === "nam-dan")!;
    // Not in the room: a readable header all the same.
    expect(district.present).toBe(false);
    expect(district.name).toBe("Nam Dan");
    // With the names the server sends along, the header is the district's real name.
    const named = sites.map((s) =>
      s.path.length === 2 ? { ...s, path_names: ["UBND tỉnh Nghệ An", "Huyện Nam Đàn"] } : s,
    );
    expect(buildTree(named)[0].children.find((c) => c.id === "nam-dan")!.name).toBe("Huyện Nam Đàn");
    expect(district.children.map((c) => c.name)).toEqual(["Xã Kim Liên", "Xã Xuân Hòa"]);
    expect(root.children.map((c) => c.id)).toEqual(["nam-dan", "tp-vinh"]);
  });

  it("works for a two-level tree too", () => {
    const two = [
      { id: "xa-a", name: "Xã A", level: "commune", path: ["tinh"] },
      { id: "tinh", name: "Tỉnh", level: "province", path: [] },
    ];
    const [root] = buildTree(two);
    expect(root.children.map((c) => c.id)).toEqual(["xa-a"]);
    expect(readable("tp-vinh")).toBe("Tp Vinh");
  });
});

describe("locales", () => {
  it("have the same keys in Vietnamese and English", () => {
    expect(Object.keys(en).sort()).toEqual(Object.keys(vi).sort());
  });

  it("keep Vietnamese diacritics", () => {
    expect(vi["prejoin.join"]).toBe("Tham gia");
    expect(vi["call.raise"]).toContain("Giơ tay");
  });
});

describe("quality indicator", () => {
  const q: Quality = {
    rtt_ms: 152.4,
    uplink_loss_pct: 4.96,
    downlink_loss_pct: 0,
    estimate_bps: 240000,
    send_bps: 231400,
    send_size: [320, 180],
    reduced: true,
    video_paused: false,
    grade: "fair",
    sites: [{ site: "xa-a", recv_bps: 48000, audio_loss_pct: 12.5, size: null, grade: "poor" }],
  };

  it("says the link's figures in Vietnamese", () => {
    setLang("vi");
    expect(linkDetails(q, "udp")).toBe("trễ 152 ms · mất 5,0 % gói · gửi 231 kbit/s · 320x180 · UDP");
    expect(linkDetails({ ...q, video_paused: true, rtt_ms: null, uplink_loss_pct: null, downlink_loss_pct: null }, null)).toBe(
      "gửi 231 kbit/s · chỉ gửi tiếng",
    );
    expect(siteDetails(q.sites[0])).toBe("Kết nối kém — nhận 48 kbit/s · mất 13 % tiếng");
  });

  it("and in English", () => {
    setLang("en");
    expect(siteDetails({ ...q.sites[0], audio_loss_pct: null, size: [640, 360], grade: "good" })).toMatch(
      /receiving 48 kbit\/s · 640x360$/,
    );
    setLang("vi");
  });
});
