// What every view shares: building elements, live lists, and how amounts, sizes and dates read.

import { useEffect, useState } from "./vendor/preact-htm.module.js";

export const $ = (selector) => document.querySelector(selector);

/** A new element with attributes (`dataset` as an object) and children; null children are skipped. */
export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== undefined && child !== null));
  return node;
}

// How many entries a live feed (blocks, transactions, mining, rewards) keeps: a tab left open for a
// day would otherwise hold every block and reward since it opened.
export const FEED_LENGTH = 100;

/** The entry of `list` shown under `key` (its `data-key`), if any. */
export function listed(list, key) {
  return list.querySelector(`[data-key="${CSS.escape(key)}"]`);
}

/** Put `node` in `list` under `key`, replacing the entry of that key; at most `keep` entries stay. */
export function upsert(list, key, node, { prepend = true, keep = Infinity } = {}) {
  node.dataset.key = key;
  const existing = listed(list, key);
  if (existing) existing.replaceWith(node);
  else if (prepend) list.prepend(node);
  else list.append(node);
  node.classList.add("new");
  while (list.children.length > keep) (prepend ? list.lastElementChild : list.firstElementChild).remove();
  return node;
}

/** A money string without its padding: "1.500000000" is "1.5", "2.000000000" is "2". */
export function formatAmount(amount) {
  if (amount === undefined || amount === null) return "?";
  const text = String(amount);
  return text.includes(".") ? text.replace(/0+$/, "").replace(/\.$/, "") : text;
}

/** A byte count for people: "1.2 MB". */
export function formatSize(bytes) {
  if (bytes === undefined || bytes === null) return null;
  const units = ["bytes", "kB", "MB", "GB", "TB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return unit ? `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}` : `${value} bytes`;
}

export const formatDate = (iso) => (iso ? new Date(iso).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" }) : null);
export const datapodHref = (id) => `#/datapods/${id}`;

/** A view's shared state for Preact: `changed()` redraws every component that called `use()`. */
export function createStore(state) {
  const listeners = new Set();
  return {
    changed: () => listeners.forEach((listener) => listener()),
    use() {
      const [, setVersion] = useState(0);
      useEffect(() => {
        const listener = () => setVersion((version) => version + 1);
        listeners.add(listener);
        return () => listeners.delete(listener);
      }, []);
      return state;
    },
  };
}
