// The roster grouped by the administrative tree: province → district → commune, as deep as
// the directory goes. Pure functions, so they are unit-tested without a window.

export interface Site {
  id: string;
  name: string;
  level: "province" | "district" | "commune" | string;
  /** Ancestor ids from the root down, and their names (when the server knows them). */
  path: string[];
  path_names?: string[];
}

export interface Node {
  id: string;
  name: string;
  level: string;
  /** Whether this site is in the room (a group header may be only an ancestor). */
  present: boolean;
  children: Node[];
}

/**
 * Builds the tree of the sites present. An ancestor that is not in the room still heads its
 * group, named by its id made readable when its name is unknown.
 */
export function buildTree(sites: Site[], known_names: Map<string, string> = new Map()): Node[] {
  const names = new Map(known_names);
  const nodes = new Map<string, Node>();
  const roots: Node[] = [];
  const known = new Map<string, Site>();
  sites.forEach((s) => {
    known.set(s.id, s);
    s.path.forEach((anc, i) => {
      const n = s.path_names?.[i];
      if (n && !names.has(anc)) names.set(anc, n);
    });
  });
  const node = (id: string, level: string, present: boolean): Node => {
    let n = nodes.get(id);
    if (!n) {
      const s = known.get(id);
      n = { id, name: s?.name ?? names.get(id) ?? readable(id), level: s?.level ?? level, present, children: [] };
      nodes.set(id, n);
    }
    n.present ||= present;
    return n;
  };
  const levels = ["province", "district", "commune"];
  for (const s of [...sites].sort((a, b) => a.path.length - b.path.length || a.name.localeCompare(b.name, "vi"))) {
    let parent: Node | null = null;
    s.path.forEach((anc, depth) => {
      const fresh = !nodes.has(anc);
      const n = node(anc, levels[depth] ?? "commune", false);
      if (fresh) (parent ? parent.children : roots).push(n);
      parent = n;
    });
    const fresh = !nodes.has(s.id);
    const me = node(s.id, s.level, true);
    if (fresh) (parent ? (parent as Node).children : roots).push(me);
  }
  const sort = (list: Node[]) => {
    list.sort((a, b) => a.name.localeCompare(b.name, "vi"));
    list.forEach((n) => sort(n.children));
  };
  sort(roots);
  return roots;
}

/** `nam-dan-kim-lien` → `Nam Dan Kim Lien` (only when no name is known). */
export function readable(id: string): string {
  return id
    .split("-")
    .filter(Boolean)
    .map((w) => w[0].toUpperCase() + w.slice(1))
    .join(" ");
}
