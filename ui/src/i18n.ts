// All words the UI shows come from the locale files; Vietnamese is the default.
import vi from "./locales/vi.json";
import en from "./locales/en.json";

export type Lang = "vi" | "en";
type Key = keyof typeof vi;

const tables: Record<Lang, Record<Key, string>> = { vi, en };
let lang: Lang = "vi";

export function setLang(l: string | undefined): void {
  lang = l === "en" ? "en" : "vi";
  if (typeof document !== "undefined") document.documentElement.lang = lang;
}

export function currentLang(): Lang {
  return lang;
}

/** The sentence for `key`, with `{name}` placeholders filled in. */
export function t(key: Key, vars: Record<string, string | number> = {}): string {
  const text = tables[lang][key] ?? tables.vi[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, k: string) => String(vars[k] ?? `{${k}}`));
}

/** Fills every `data-i18n` element under `root`. */
export function translate(root: ParentNode = document): void {
  root.querySelectorAll<HTMLElement>("[data-i18n]").forEach((el) => {
    el.textContent = t(el.dataset.i18n as Key);
  });
}

export type { Key };
