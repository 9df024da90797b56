// The Explorer view (#/chain): a block explorer of the KVP chain. Live blocks with a chart of block
// times and transactions per block, the latest transactions and mining rewards (each painted from
// REST first, then followed live), the halving schedule and burns, search, and a page per block
// (#/chain/block/<height or hash>), transaction (#/chain/tx/<hash>) and address (#/chain/address/<kvp1...>).
import { html, render, useEffect, useRef, useState } from "../vendor/preact-htm.module.js";
import uPlot from "../vendor/uPlot.esm.js";
import { createStore, FEED_LENGTH, formatAmount } from "../ui.js";

/** Where other views link a transaction, an address or a block (height or hash). */
export const txHref = (hash) => `#/chain/tx/${hash}`;
export const addressHref = (address) => `#/chain/address/${address}`;
export const blockHref = (block) => `#/chain/block/${block}`;

const CHART_BLOCKS = 60; // the chart shows the gaps before the last 60 blocks
const CHART_HEIGHT = 220;
const PAGE = 20; // rows per page on the block and address pages
const TX_HASH = /^[0-9a-f]{64}$/i;
const BLOCK_REF = /^([0-9]{1,10}|[0-9a-f]{64})$/i;
const ADDRESS = /^kvp1[0-9a-f]{40}$/i;

// --- the store: what the feeds hold, shared by every page of the view ---------------------------

const store = {
  path: "",
  blocks: new Map(), // height -> block
  txs: new Map(), // hash -> transaction as the feed knows it
  rewards: new Map(), // key -> mining feed entry
  latestHeight: null, // the chain's tip by REST, before any live block
  halving: null,
  burns: null,
  loaded: { blocks: false, txs: false, rewards: false },
  errors: {}, // what failed to load, by feed: shown in role="alert", cleared by the next success
};
const { changed, use: useStore } = createStore(store);

let context = null;
let markReady;
const ready = new Promise((resolve) => { markReady = resolve; });


/** Keep at most FEED_LENGTH entries of a feed: the newest by `order`. */
function trim(map, order) {
  if (map.size <= FEED_LENGTH) return;
  const oldest = [...map.entries()].sort((a, b) => order(a[1]) - order(b[1])).slice(0, map.size - FEED_LENGTH);
  for (const [key] of oldest) map.delete(key);
}

const tip = () => Math.max(store.latestHeight ?? 0, 0, ...store.blocks.keys());
const eventTime = (event) => (event.ts ? event.ts * 1000 : Date.now());
const parseTime = (iso) => (iso ? Date.parse(iso) : null);

function fail(feed, error) {
  store.errors[feed] = error?.message ?? String(error);
  changed();
}

function succeed(feed) {
  if (store.errors[feed]) delete store.errors[feed];
}

// --- blocks -----------------------------------------------------------------------------------

function putBlock(block, live) {
  const height = Number(block.height);
  if (!Number.isInteger(height) || height < 0) return;
  const known = store.blocks.get(height);
  store.blocks.set(height, { ...known, ...block, height, live: known ? known.live : live });
}

async function loadBlocks(limit = FEED_LENGTH) {
  try {
    const data = await context.api("GET", `/api/v1/blocks?limit=${limit}`);
    for (const block of data.blocks ?? []) putBlock(block, false);
    store.latestHeight = Math.max(store.latestHeight ?? 0, data.latest_height ?? 0);
    trim(store.blocks, (block) => block.height);
    store.loaded.blocks = true;
    succeed("blocks");
    changed();
  } catch (error) {
    fail("blocks", error);
  }
}

function onBlockEvent(event) {
  const data = event.data ?? {};
  if (event.type === "block_added") {
    // The time between blocks comes from the block's own timestamp; an event without one has its publication time.
    putBlock({ timestamp: new Date(eventTime(event)).toISOString(), ...data }, true);
    trim(store.blocks, (block) => block.height);
    if (store.halving?.next_halving_height && tip() + 1 >= store.halving.next_halving_height) loadHalving();
  } else if (event.type === "blocks_burned") {
    for (const height of data.block_ids ?? []) {
      const block = store.blocks.get(Number(height));
      if (block) store.blocks.set(block.height, { ...block, burned: true });
    }
    loadBurns();
  }
  if (store.errors.blocks) loadBlocks(); // the hub is reachable again: re-read what failed
  changed();
}

// --- transactions -----------------------------------------------------------------------------

function putTx(tx, at, live) {
  if (!tx.hash) return;
  const known = store.txs.get(tx.hash);
  const merged = { ...known };
  for (const [name, value] of Object.entries(tx)) if (value !== undefined && value !== null) merged[name] = value;
  merged.at = known?.at ?? at;
  merged.live = known ? known.live : live;
  store.txs.set(tx.hash, merged);
}

async function loadTxs(limit = FEED_LENGTH) {
  try {
    const data = await context.api("GET", `/api/v1/chain/transactions?limit=${limit}`);
    for (const tx of data.items ?? []) putTx(tx, parseTime(tx.created_at), false);
    trim(store.txs, (tx) => tx.at);
    store.loaded.txs = true;
    succeed("txs");
    changed();
  } catch (error) {
    fail("txs", error);
  }
}

const TX_STATUS = { transaction_pending: "pending", transaction_confirmed: "confirmed", transaction_rejected: "rejected" };

function onTxEvent(event) {
  const data = event.data ?? {};
  const status = TX_STATUS[event.type];
  if (!status) return;
  putTx({ ...data, status, error: data.reason }, eventTime(event), true);
  trim(store.txs, (tx) => tx.at);
  if (store.errors.txs) loadTxs();
  changed();
}

// --- mining rewards ---------------------------------------------------------------------------

function putReward(entry) {
  const known = store.rewards.get(entry.key);
  store.rewards.set(entry.key, { ...entry, at: known?.at ?? entry.at, live: known ? known.live : entry.live });
}

async function loadRewards(limit = FEED_LENGTH) {
  try {
    const data = await context.api("GET", `/api/v1/chain/mining-rewards?limit=${limit}`);
    for (const reward of data.items ?? []) {
      putReward({ key: `${reward.height}:${reward.user_id ?? reward.miner}`, kind: "reward", height: reward.height,
        miner: reward.miner, amount: reward.amount, device: reward.device_type, at: parseTime(reward.created_at), live: false });
    }
    trim(store.rewards, (entry) => entry.at);
    store.loaded.rewards = true;
    succeed("rewards");
    changed();
  } catch (error) {
    fail("rewards", error);
  }
}

function onMiningEvent(event) {
  const data = event.data ?? {};
  const at = eventTime(event);
  if (event.type === "mining_rewarded") {
    putReward({ key: `${data.height}:${data.miner_id ?? data.miner}`, kind: "reward", height: data.height,
      miner: data.miner, amount: data.reward, device: data.device_type, shares: data.shares, at, live: true });
  } else if (event.type === "halving_scheduled") {
    putReward({ key: event.id ?? `halving:${data.height}`, kind: "halving", height: data.height, halved: data.halved,
      amount: data.reward, nextHeight: data.next_halving_height, nextReward: data.next_reward, at, live: true });
    loadHalving();
  } else {
    // A kind this page does not know yet: its name and what it names, never raw data.
    putReward({ key: event.id ?? `${event.type}:${at}`, kind: "other", type: event.type, height: data.height,
      miner: data.miner, amount: data.reward ?? data.amount, at, live: true });
  }
  trim(store.rewards, (entry) => entry.at);
  if (store.errors.rewards) loadRewards();
  changed();
}

// --- halving and burns ------------------------------------------------------------------------

async function loadHalving() {
  try {
    store.halving = await context.api("GET", "/api/v1/chain/halving?eras=8");
    succeed("halving");
    changed();
  } catch (error) {
    fail("halving", error);
  }
}

async function loadBurns() {
  try {
    store.burns = await context.api("GET", "/api/v1/chain/burns?limit=10");
    succeed("burns");
    changed();
  } catch (error) {
    fail("burns", error);
  }
}

/**
 * Follow a channel: paint from REST at once, subscribe, then read the newest page again, since
 * something sealed between the first read and the subscription reached neither.
 */
async function follow(channel, onEvent, load) {
  const first = load();
  const live = (event) => {
    delete store.errors[channel]; // the hub joined it after all (it retries on every reconnect)
    onEvent(event);
  };
  try {
    await context.hub.subscribe("/chain", channel, { onEvent: live, onGap: () => load() });
  } catch (error) {
    fail(channel, error);
  }
  await first;
  await load(PAGE);
}

// --- formatting -------------------------------------------------------------------------------

const short = (text, head = 8, tail = 6) => (text && text.length > head + tail + 1 ? `${text.slice(0, head)}…${text.slice(-tail)}` : text ?? "");
const kvp = (amount) => `${formatAmount(amount)} KVP`;
const plural = (count, one, many = `${one}s`) => `${count} ${count === 1 ? one : many}`;
const isToday = (date) => date.toDateString() === new Date().toDateString();

function Time({ iso, at, long }) {
  const ms = at ?? parseTime(iso);
  if (ms === null || ms === undefined || Number.isNaN(ms)) return null;
  const date = new Date(ms);
  const text = long || !isToday(date) ? date.toLocaleString() : date.toLocaleTimeString();
  return html`<time datetime=${date.toISOString()} title=${date.toLocaleString()}>${text}</time>`;
}

const mine = (address) => Boolean(address) && address === context?.wallet?.address?.();

/** An address as a link to its page, shortened in lists (the whole of it in the title), "you" marked. */
function Address({ address, full }) {
  if (!address) return html`<span class="none">nobody</span>`;
  if (!ADDRESS.test(address)) return html`<span class="hash" title=${address}>${short(address, 12, 4)}</span>`;
  return html`<a class="hash" href=${addressHref(address)} title=${address}>${full ? address : short(address, 10, 6)}</a>${
    mine(address) ? html` <span class="you">(you)</span>` : null}`;
}

function BlockLink({ height, children }) {
  if (height === null || height === undefined) return null;
  return html`<a href=${blockHref(height)}>${children ?? `#${height}`}</a>`;
}

function TxLink({ hash }) {
  return html`<a class="hash" href=${txHref(hash)} title=${hash}>${short(hash)}</a>`;
}

/** The whole of a hash or address, wrapping, with a button that copies it. */
function Copyable({ value, label }) {
  const [copied, setCopied] = useState("");
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(value);
      setCopied("Copied.");
    } catch {
      setCopied("Copying is not allowed here: select the text instead.");
    }
    setTimeout(() => setCopied(""), 3000);
  };
  return html`<span class="copyable"><code class="full">${value}</code>
    <button type="button" class="copy" aria-label=${`Copy the ${label}`} onClick=${copy}>Copy</button>
    <span class="copied" role="status">${copied}</span></span>`;
}

function Status({ tx }) {
  if (tx.status === "confirmed") {
    return html`<span class="status confirmed">confirmed${tx.height ? html` in <${BlockLink} height=${tx.height} />` : null}</span>`;
  }
  if (tx.status === "rejected") return html`<span class="status rejected">rejected${tx.error ? `: ${tx.error}` : ""}</span>`;
  return html`<span class="status pending">pending</span>`;
}

/** A row's facts, spaced (the flex gap shows the space, the text keeps it for screen readers). */
const Meta = ({ items }) => html`<span class="meta">${items.filter(Boolean).flatMap((item, index) => (index ? [" ", item] : [item]))}</span>`;

const Alert = ({ text }) => html`<p class="error" role="alert">${text ?? ""}</p>`;

// --- the overview: stats, chart, live lists, halving, burns -----------------------------------

function chartPoints(blocks) {
  const ascending = [...blocks.values()].sort((a, b) => a.height - b.height);
  const recent = ascending.slice(-CHART_BLOCKS);
  const points = { heights: [], gaps: [], txs: [] };
  for (const block of recent) {
    const previous = store.blocks.get(block.height - 1);
    const gap = previous ? (parseTime(block.timestamp) - parseTime(previous.timestamp)) / 1000 : null;
    points.heights.push(block.height);
    points.gaps.push(gap === null || Number.isNaN(gap) ? null : Math.max(0, gap));
    points.txs.push(Number(block.tx_count ?? block.transactions?.length ?? 0));
  }
  return points;
}

function chartSummary(points) {
  const gaps = points.gaps.filter((gap) => gap !== null);
  if (!points.heights.length) return "No blocks yet: the chart fills as blocks are sealed.";
  const txs = points.txs.reduce((sum, count) => sum + count, 0);
  const range = points.heights.length > 1 ? `blocks #${points.heights[0]} to #${points.heights.at(-1)}` : `block #${points.heights[0]}`;
  const perBlock = `${(txs / points.heights.length).toFixed(1)} transactions per block (${plural(txs, "transaction")} in ${range})`;
  if (!gaps.length) return `Not enough blocks yet to time them; ${perBlock}.`;
  const average = gaps.reduce((sum, gap) => sum + gap, 0) / gaps.length;
  return `Average ${average.toFixed(1)} s between the last ${plural(gaps.length, "block")} ` +
    `(shortest ${Math.min(...gaps).toFixed(1)} s, longest ${Math.max(...gaps).toFixed(1)} s); ${perBlock}.`;
}

const integerTicks = (u, splits) => splits.map((value) => (Number.isInteger(value) ? String(value) : ""));

function Chart({ points }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    const node = box.current;
    const width = () => Math.max(240, node.clientWidth || 600);
    plot.current = new uPlot({
      width: width(), height: CHART_HEIGHT, legend: { show: false }, cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false }, s: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] },
        tx: { range: (u, min, max) => [0, Math.max(4, Math.ceil(max * 1.2))] } },
      axes: [
        { label: "Block height", values: integerTicks, stroke: "#1d2330" },
        { scale: "s", label: "Seconds", stroke: "#1d2330", size: 50 },
        { scale: "tx", side: 1, label: "Transactions", values: integerTicks, stroke: "#1d2330", grid: { show: false }, size: 45 },
      ],
      series: [
        { label: "Block height" },
        { label: "Transactions", scale: "tx", stroke: "#a34f00", fill: "rgba(163, 79, 0, 0.3)", width: 1,
          paths: uPlot.paths.bars({ size: [0.6, 24] }), points: { show: false } },
        { label: "Seconds since the previous block", scale: "s", stroke: "#3656d8", width: 2, spanGaps: false,
          points: { show: true, size: 5, fill: "#3656d8" } },
      ],
    }, [[], [], []], node);
    // Phones turn, windows resize: the chart follows its box's width.
    const observer = new ResizeObserver(() => {
      if (node.clientWidth > 0 && Math.abs(node.clientWidth - plot.current.width) > 1) {
        plot.current.setSize({ width: node.clientWidth, height: CHART_HEIGHT });
      }
    });
    observer.observe(node);
    return () => { observer.disconnect(); plot.current.destroy(); };
  }, []);
  useEffect(() => {
    plot.current?.setData([points.heights, points.txs, points.gaps]);
  }, [points]);
  return html`<div class="chart-box" ref=${box}></div>`;
}

function ChartFigure() {
  const points = chartPoints(store.blocks);
  const summary = chartSummary(points);
  return html`<figure class="chart" role="group" aria-labelledby="chain-chart-title" data-points=${points.heights.length}
      data-gaps=${points.gaps.filter((gap) => gap !== null).length}>
    <figcaption id="chain-chart-title">Block times and transactions per block</figcaption>
    <div role="img" aria-label=${`Chart of the seconds between blocks and the transactions in each block, for the last ${plural(points.heights.length, "block")}`}
      aria-describedby="chain-chart-summary"><${Chart} points=${points} /></div>
    <p class="legend" aria-hidden="true"><span class="key seconds"></span> seconds since the previous block${" "}
      <span class="key txs"></span> transactions in the block</p>
    <p id="chain-chart-summary" class="summary">${summary}</p>
  </figure>`;
}

function Stats() {
  const height = tip();
  const latest = store.blocks.get(height);
  const halving = store.halving;
  const burns = store.burns;
  return html`<dl class="stats">
    <div><dt>Latest block</dt><dd>${height ? html`<${BlockLink} height=${height} />` : "none yet"}
      ${latest?.timestamp ? html` <span class="muted">at <${Time} iso=${latest.timestamp} /></span>` : null}</dd></div>
    <div><dt>Block reward</dt><dd>${halving ? kvp(halving.current_reward) : "…"}</dd></div>
    <div><dt>Next halving</dt><dd>${halving?.next_halving_height
      ? html`block <${BlockLink} height=${halving.next_halving_height}>#${halving.next_halving_height}<//>,
          in ${plural(Math.max(0, halving.next_halving_height - height), "block")}` : "…"}</dd></div>
    <div><dt>Burned</dt><dd>${burns ? `${plural(burns.burned_blocks, "block")}, ${kvp(burns.burned_rewards)}` : "…"}</dd></div>
  </dl>`;
}

function Feed({ id, title, loaded, error, retry, empty, items, render: row }) {
  return html`<section class="feed" aria-labelledby=${`${id}-title`}>
    <h3 id=${`${id}-title`}>${title}</h3>
    <${Alert} text=${error ? `Could not load the ${title.toLowerCase()}: ${error}` : ""} />
    ${error ? html`<button type="button" class="retry" onClick=${retry}>Try again</button>` : null}
    <ul id=${id} class="feed-list" aria-labelledby=${`${id}-title`} aria-live="polite" aria-relevant="additions" tabindex="0">
      ${items.map(row)}
    </ul>
    ${items.length ? null : html`<p class="empty">${loaded ? empty : "Loading…"}</p>`}
  </section>`;
}

function BlockRow(block) {
  const txs = Number(block.tx_count ?? block.transactions?.length ?? 0);
  return html`<li key=${block.height} data-key=${String(block.height)} class=${block.live ? "new" : ""}>
    <span class="main"><${BlockLink} height=${block.height}>#${block.height}<//></span>${" "}
    <${Meta} items=${[
      html`<${Time} iso=${block.timestamp} />`,
      html`<span>${plural(txs, "transaction")}</span>`,
      block.reward !== undefined ? html`<span>reward ${kvp(block.reward)}</span>` : null,
      block.miner ? html`<span>miner <${Address} address=${block.miner} /></span>` : null,
      block.burned ? html`<span class="status rejected">burned</span>` : null,
      block.hash ? html`<span class="hash" title=${block.hash}>${short(block.hash)}</span>` : null,
    ]} />
  </li>`;
}

function TxRow(tx) {
  return html`<li key=${tx.hash} data-key=${tx.hash} data-status=${tx.status} class=${tx.live ? "new" : ""}>
    <span class="main"><${TxLink} hash=${tx.hash} /></span>${" "}
    <${Meta} items=${[
      html`<span><${Address} address=${tx.sender} /> → <${Address} address=${tx.receiver} /></span>`,
      tx.amount !== undefined ? html`<strong>${kvp(tx.amount)}</strong>` : null,
      html`<${Status} tx=${tx} />`,
      html`<${Time} at=${tx.at} />`,
    ]} />
  </li>`;
}

const humanize = (type) => String(type ?? "event").replaceAll("_", " ").replace(/^./, (c) => c.toUpperCase());

function MiningRow(entry) {
  let text;
  if (entry.kind === "reward") {
    text = html`<${Address} address=${entry.miner} /> earned <strong>${kvp(entry.amount)}</strong>${" "}
      for block <${BlockLink} height=${entry.height} />${entry.device ? ` · ${entry.device}` : ""}${
        entry.shares ? ` · ${plural(entry.shares, "share")}` : ""}`;
  } else if (entry.kind === "halving") {
    const next = entry.nextHeight ? html`; next halving at block <${BlockLink} height=${entry.nextHeight} /> (${kvp(entry.nextReward)})` : "";
    text = entry.halved
      ? html`Halving at block <${BlockLink} height=${entry.height} />: the reward is now <strong>${kvp(entry.amount)}</strong>${next}`
      : html`Reward schedule from block <${BlockLink} height=${entry.height} />: <strong>${kvp(entry.amount)}</strong> per block${next}`;
  } else {
    text = html`${humanize(entry.type)}${entry.miner ? html` · <${Address} address=${entry.miner} />` : null}${
      entry.amount !== undefined && entry.amount !== null ? html` · <strong>${kvp(entry.amount)}</strong>` : null}${
      entry.height !== undefined && entry.height !== null ? html` · block <${BlockLink} height=${entry.height} />` : null}`;
  }
  return html`<li key=${entry.key} data-key=${entry.key} data-kind=${entry.kind} class=${entry.live ? "new" : ""}>
    <span class="main-text">${text}</span> <span class="meta"><${Time} at=${entry.at} /></span>
  </li>`;
}

function Halving() {
  const halving = store.halving;
  return html`<section class="panel" aria-labelledby="chain-halving-title">
    <h3 id="chain-halving-title">Halving schedule</h3>
    <${Alert} text=${store.errors.halving ? `Could not load the halving schedule: ${store.errors.halving}` : ""} />
    ${halving ? html`
      <p>The reward starts at ${kvp(halving.initial_block_reward)} per block and halves every ${plural(halving.halving_interval, "block")} (a block every ${halving.target_block_seconds} s is the target).
        Now: era ${halving.current_era}, ${kvp(halving.current_reward)} per block; from block${" "}
        <${BlockLink} height=${halving.next_halving_height} />, ${kvp(halving.next_reward)}.</p>
      <table id="chain-halving">
        <caption class="visually-hidden">Reward per block in each era</caption>
        <thead><tr><th scope="col">Era</th><th scope="col">Blocks</th><th scope="col">Reward per block</th></tr></thead>
        <tbody>${halving.eras.map((era) => html`<tr key=${era.era} class=${era.era === halving.current_era ? "current" : ""}
            aria-current=${era.era === halving.current_era ? "true" : null}>
          <td>${era.era}${era.era === halving.current_era ? " (now)" : ""}</td>
          <td>${era.from_height.toLocaleString()}–${era.to_height.toLocaleString()}</td>
          <td>${kvp(era.reward)}</td></tr>`)}</tbody>
      </table>` : html`<p class="empty">Loading…</p>`}
  </section>`;
}

function Burns() {
  const burns = store.burns;
  return html`<section class="panel" aria-labelledby="chain-burns-title">
    <h3 id="chain-burns-title">Burns</h3>
    <${Alert} text=${store.errors.burns ? `Could not load the burns: ${store.errors.burns}` : ""} />
    ${burns ? html`
      <p id="chain-burn-totals">${burns.burned_blocks
        ? html`${plural(burns.burned_blocks, "block")} burned, with ${kvp(burns.burned_rewards)} of mining rewards
            ${burns.last_burn_time ? html`; the last burn at <${Time} iso=${burns.last_burn_time} long />` : null}.`
        : "No block has been burned: 0 blocks, 0 KVP."}</p>
      ${burns.items.length ? html`<ul class="plain">${burns.items.map((block) => html`<li key=${block.height}>
        <${BlockLink} height=${block.height} /> · ${kvp(block.reward)} · <${Time} iso=${block.timestamp} /></li>`)}</ul>` : null}`
      : html`<p class="empty">Loading…</p>`}
  </section>`;
}

function Overview() {
  const blocks = [...store.blocks.values()].sort((a, b) => b.height - a.height);
  const txs = [...store.txs.values()].sort((a, b) => b.at - a.at);
  const rewards = [...store.rewards.values()].sort((a, b) => b.at - a.at || String(b.key).localeCompare(String(a.key)));
  return html`<div class="overview">
    <h2 id="chain-page-title" tabindex="-1">Explorer</h2>
    <${Stats} />
    <${ChartFigure} />
    <div class="columns">
      <${Feed} id="blocks" title="Latest blocks" loaded=${store.loaded.blocks} error=${store.errors.blocks || store.errors["chain:blocks"]}
        retry=${() => loadBlocks()} empty="No blocks yet: the first appears here as soon as it is sealed." items=${blocks} render=${BlockRow} />
      <${Feed} id="transactions" title="Latest transactions" loaded=${store.loaded.txs} error=${store.errors.txs || store.errors["chain:transactions"]}
        retry=${() => loadTxs()} empty="No transactions yet: transfers appear here when they are submitted, and again when a block confirms them."
        items=${txs} render=${TxRow} />
    </div>
    <${Feed} id="mining" title="Mining rewards" loaded=${store.loaded.rewards} error=${store.errors.rewards || store.errors["chain:mining"]}
      retry=${() => loadRewards()} empty="No mining rewards yet: each block's reward appears here, with who earned it."
      items=${rewards} render=${MiningRow} />
    <div class="columns">
      <${Halving} />
      <${Burns} />
    </div>
  </div>`;
}

// --- pages: block, transaction, address -------------------------------------------------------

/** Load what a page shows; `deps` reload it. */
function useLoad(load, deps) {
  const [state, setState] = useState({ data: null, error: null, missing: false, loading: true });
  useEffect(() => {
    let current = true;
    setState((old) => ({ ...old, loading: true }));
    load().then(
      (data) => { if (current) setState({ data, error: null, missing: false, loading: false }); },
      (error) => {
        if (!current) return;
        const missing = error.code === "not_found" || error.code === "invalid_payload";
        setState((old) => ({ data: missing ? null : old.data, error: missing ? null : error.message, missing, loading: false }));
      });
    return () => { current = false; };
  }, deps);
  return state;
}

/** A keyset-paged list ("older" / "more" follow `next`); a new `version` merges a fresh first page on top. */
function usePaged(path, cursor, keyOf, version) {
  const [state, setState] = useState({ items: [], next: null, loading: true, error: null, extra: null });
  const fetchPage = async (key) => {
    const separator = path.includes("?") ? "&" : "?";
    return context.api("GET", `${path}${separator}limit=${PAGE}${key !== null && key !== undefined ? `&${cursor}=${key}` : ""}`);
  };
  useEffect(() => {
    if (!path) return undefined;
    let current = true;
    fetchPage(null).then((data) => {
      if (!current) return;
      setState((old) => {
        const fresh = data.items ?? [];
        const keys = new Set(fresh.map(keyOf));
        const rest = old.items.filter((item) => !keys.has(keyOf(item)));
        return { items: [...fresh, ...rest], next: old.items.length > fresh.length ? old.next : data.next,
          loading: false, error: null, extra: data };
      });
    }, (error) => { if (current) setState((old) => ({ ...old, loading: false, error: error.message })); });
    return () => { current = false; };
  }, [path, version]);
  const more = async () => {
    setState((old) => ({ ...old, loading: true }));
    try {
      const data = await fetchPage(state.next);
      setState((old) => {
        const keys = new Set(old.items.map(keyOf));
        return { ...old, items: [...old.items, ...(data.items ?? []).filter((item) => !keys.has(keyOf(item)))],
          next: data.next, loading: false, error: null };
      });
    } catch (error) {
      setState((old) => ({ ...old, loading: false, error: error.message }));
    }
  };
  return { ...state, more };
}

function PagedList({ id, title, list, empty, render: row, moreLabel, children }) {
  return html`<section id=${id} class="panel" aria-labelledby=${`${id}-title`}>
    <h3 id=${`${id}-title`}>${title}</h3>
    ${children}
    <${Alert} text=${list.error ? `Could not load the ${title.toLowerCase()}: ${list.error}` : ""} />
    ${list.items.length ? html`<ul class="plain rows-list" aria-live="polite">${list.items.map(row)}</ul>`
      : html`<p class="empty">${list.loading ? "Loading…" : empty}</p>`}
    ${list.next !== null && list.next !== undefined
      ? html`<button type="button" class="more" onClick=${list.more} disabled=${list.loading}>${moreLabel}</button>` : null}
  </section>`;
}

/**
 * A page's frame: the way back, the heading and the error. Loading, loaded and not found share it,
 * so the heading that took the focus stays in place while the page fills.
 */
function Frame({ crumb, title, error, page, children }) {
  return html`<article class="page" data-page=${page}>
    <p class="crumbs" role="navigation" aria-label="Breadcrumb"><a href="#/chain">Explorer</a> ›${" "}
      <span aria-current="page">${crumb}</span></p>
    <h2 id="chain-page-title" tabindex="-1">${title}</h2>
    <${Alert} text=${error} />
    ${children}
  </article>`;
}

function NotFound({ title, text }) {
  return html`<${Frame} crumb="Not found" title=${title} page="missing">
    <p class="notice nothing" role="status">${text}</p>
    <p><a href="#/chain">Back to the latest blocks</a></p>
  <//>`;
}

const Loading = ({ crumb, error, page }) => html`<${Frame} crumb=${crumb} title=${crumb} error=${error} page=${page}>
  <p class="empty">${error ? "The page could not be read." : "Loading…"}</p><//>`;

function BlockPage({ reference }) {
  useStore();
  const valid = BLOCK_REF.test(reference);
  const block = useLoad(() => (valid ? context.api("GET", `/api/v1/chain/blocks/${reference}`) : Promise.reject(Object.assign(new Error("bad"), { code: "not_found" }))), [reference]);
  const data = block.data;
  // The block's lists once the block is known (an unknown block has none to ask for).
  const base = data ? `/api/v1/chain/blocks/${data.height}` : null;
  const txs = usePaged(base && `${base}/transactions`, "after", (tx) => tx.hash, 0);
  const rewards = usePaged(base && `${base}/mining-rewards`, "after", (reward) => reward.id, 0);
  if (block.missing) {
    return NotFound({ title: "Block not found", text: `Nothing found: this chain has no block ${reference.length > 12 ? short(reference) : `#${reference}`}.` });
  }
  if (!data) return Loading({ crumb: "Block", error: block.error, page: "block" });
  const height = data.height;
  const newest = tip();
  return html`<${Frame} crumb=${`Block #${height}`} title=${`Block #${height}`} error=${block.error} page="block">
    <p class="pager">
      ${height > 1 ? html`<a class="button-link" href=${blockHref(height - 1)} rel="prev">← Block #${height - 1}</a>` : null}
      ${height < newest ? html`<a class="button-link" href=${blockHref(height + 1)} rel="next">Block #${height + 1} →</a>`
        : html`<span class="muted">The latest block</span>`}
    </p>
    <dl class="facts block-facts">
      <dt>Hash</dt><dd><${Copyable} value=${data.hash} label="block hash" /></dd>
      <dt>Time</dt><dd><${Time} iso=${data.timestamp} long /></dd>
      <dt>Transactions</dt><dd id="block-tx-count">${data.tx_count}</dd>
      <dt>Miner</dt><dd><${Address} address=${data.miner} full /></dd>
      <dt>Reward</dt><dd id="block-reward">${kvp(data.reward)}</dd>
      <dt>Previous block</dt><dd>${data.previous_hash
        ? html`<a class="hash" href=${blockHref(data.previous_hash)} title=${data.previous_hash}>${short(data.previous_hash)}</a>` : "none (the first block)"}</dd>
      <dt>Difficulty</dt><dd>${data.difficulty} leading zero bits</dd>
      <dt>Nonce</dt><dd>${data.nonce}</dd>
      ${data.burned ? html`<dt>Burned</dt><dd class="status rejected">yes</dd>` : null}
    </dl>
    <${PagedList} id="block-transactions" title="Transactions in this block" list=${txs} moreLabel="More transactions"
      empty="This block holds no transactions (blocks are sealed on time, also when nobody transferred anything)."
      render=${(tx) => html`<li key=${tx.hash} data-key=${tx.hash}><${TxLink} hash=${tx.hash} />
        <span class="meta"><span><${Address} address=${tx.sender} /> → <${Address} address=${tx.receiver} /></span>
        <strong>${kvp(tx.amount)}</strong> <${Status} tx=${tx} /></span></li>`} />
    <${PagedList} id="block-rewards" title="Mining rewards for this block" list=${rewards} moreLabel="More rewards"
      empty="This block paid no mining reward."
      render=${(reward) => html`<li key=${reward.id}><${Address} address=${reward.miner} /> earned <strong>${kvp(reward.amount)}</strong>
        <span class="meta">${reward.device_type}</span></li>`} />
  <//>`;
}

function TxPage({ hash }) {
  const live = useStore().txs.get(hash.toLowerCase());
  const valid = TX_HASH.test(hash);
  const tx = useLoad(() => (valid ? context.api("GET", `/api/v1/transactions/${hash.toLowerCase()}`) : Promise.reject(Object.assign(new Error("bad"), { code: "not_found" }))),
    [hash, live?.status]);
  if (tx.missing) return NotFound({ title: "Transaction not found", text: `Nothing found: no transaction has the hash ${short(hash)}.` });
  const data = tx.data;
  if (!data) return Loading({ crumb: "Transaction", error: tx.error, page: "tx" });
  return html`<${Frame} crumb=${`Transaction ${short(data.hash)}`} title="Transaction" error=${tx.error} page="tx">
    <p class="tx-status" role="status" data-status=${data.status}>${data.status === "pending" ? "Pending: waiting for the next block to confirm it."
      : data.status === "confirmed" ? html`Confirmed in block <${BlockLink} height=${data.height} />.`
      : `Rejected${data.error ? `: ${data.error}` : ""}.`}</p>
    <dl class="facts tx-facts">
      <dt>Hash</dt><dd><${Copyable} value=${data.hash} label="transaction hash" /></dd>
      <dt>Status</dt><dd><${Status} tx=${data} /></dd>
      <dt>Block</dt><dd>${data.height ? html`<${BlockLink} height=${data.height} />` : "not yet in a block"}</dd>
      <dt>From</dt><dd id="tx-sender"><${Address} address=${data.sender} full /></dd>
      <dt>To</dt><dd id="tx-receiver"><${Address} address=${data.receiver} full /></dd>
      <dt>Amount</dt><dd id="tx-amount">${kvp(data.amount)}</dd>
      <dt>Nonce</dt><dd>${data.nonce ?? "–"}</dd>
      <dt>Submitted</dt><dd><${Time} iso=${data.created_at} long /></dd>
      <dt>Confirmed</dt><dd>${data.confirmed_at ? html`<${Time} iso=${data.confirmed_at} long />` : "not yet"}</dd>
      ${data.signature ? html`<dt>Signature</dt><dd><code class="full">${data.signature}</code></dd>` : null}
      ${data.public_key ? html`<dt>Public key</dt><dd><code class="full">${data.public_key}</code></dd>` : null}
    </dl>
  <//>`;
}

const LEDGER_REASONS = { transfer_in: "Received", transfer_out: "Sent", mining_reward: "Mining reward", demo_faucet: "Demo faucet",
  pool_grant: "Reward pool grant" };

function LedgerReference({ row }) {
  const reference = row.reference ?? "";
  if (TX_HASH.test(reference)) return html`<${TxLink} hash=${reference} />`;
  const block = /^([0-9]+):/.exec(reference);
  if (row.reason === "mining_reward" && block) return html`block <${BlockLink} height=${Number(block[1])} />`;
  return null; // a grant's or a faucet payment's own id: nothing to open here
}

function AddressPage({ address }) {
  const state = useStore();
  const lower = address.toLowerCase();
  const valid = ADDRESS.test(lower);
  // A confirmed transfer or a reward of this address changes its figures: read them again.
  const touched = [...state.txs.values()].filter((tx) => (tx.sender === lower || tx.receiver === lower) && tx.status !== "pending").length +
    [...state.rewards.values()].filter((entry) => entry.miner === lower).length;
  const summary = useLoad(() => (valid ? context.api("GET", `/api/v1/chain/addresses/${lower}`) : Promise.reject(Object.assign(new Error("bad"), { code: "not_found" }))), [lower, touched]);
  const base = summary.data ? `/api/v1/chain/addresses/${lower}` : null; // a known address only
  const txs = usePaged(base && `${base}/transactions`, "before", (tx) => tx.hash, touched);
  const ledger = usePaged(base && `${base}/ledger`, "before", (row) => row.id, touched);
  const rewards = usePaged(base && `${base}/mining-rewards`, "before", (row) => row.id, touched);
  if (summary.missing) return NotFound({ title: "Address not found", text: `Nothing found: no wallet has the address ${short(address, 12, 6)}.` });
  const data = summary.data;
  if (!data) return Loading({ crumb: "Address", error: summary.error, page: "address" });
  const totals = rewards.extra;
  return html`<${Frame} crumb=${`Address ${short(data.address, 10, 6)}`} title=${`Address${mine(data.address) ? " (your wallet)" : ""}`}
      error=${summary.error} page="address">
    <dl class="facts address-facts">
      <dt>Address</dt><dd><${Copyable} value=${data.address} label="address" /></dd>
      <dt>Balance</dt><dd id="address-balance"><strong>${kvp(data.balance)}</strong></dd>
      <dt>Pending outgoing</dt><dd id="address-pending">${kvp(data.pending_outgoing)}</dd>
      <dt>Available</dt><dd id="address-available">${kvp(data.available)}</dd>
      <dt>Next nonce</dt><dd>${data.next_nonce}</dd>
    </dl>
    <${PagedList} id="address-transactions" title="Transactions" list=${txs} moreLabel="Older transactions"
      empty="No transfers to or from this address yet."
      render=${(tx) => html`<li key=${tx.hash} data-key=${tx.hash} data-direction=${tx.direction}>
        <span class=${`direction ${tx.direction}`}>${tx.direction === "sent" ? "Sent" : "Received"}</span>${" "}
        <strong>${kvp(tx.amount)}</strong> ${tx.direction === "sent" ? "to" : "from"}${" "}
        <${Address} address=${tx.direction === "sent" ? tx.receiver : tx.sender} />
        <span class="meta"><${TxLink} hash=${tx.hash} /> <${Status} tx=${tx} /> <${Time} iso=${tx.created_at} /></span></li>`} />
    <${PagedList} id="address-ledger" title="Balance ledger" list=${ledger} moreLabel="Older ledger entries"
      empty="No balance changes yet."
      render=${(row) => html`<li key=${row.id} data-key=${String(row.id)}>
        <span>${LEDGER_REASONS[row.reason] ?? humanize(row.reason)}</span>${" "}
        <strong class=${row.delta.startsWith("-") ? "minus" : "plus"}>${row.delta.startsWith("-") ? "−" : "+"}${kvp(row.delta.replace(/^-/, ""))}</strong>
        <${Meta} items=${[html`<span>balance ${kvp(row.balance_after)}</span>`, LedgerReference({ row }), html`<${Time} iso=${row.created_at} />`]} /></li>`} />
    <${PagedList} id="address-rewards" title="Mining rewards" list=${rewards} moreLabel="Older rewards"
      empty="This address has earned no mining rewards."
      render=${(row) => html`<li key=${row.id} data-key=${String(row.id)}><strong>${kvp(row.amount)}</strong> for block${" "}
        <${BlockLink} height=${row.height} /> <span class="meta">${row.device_type} · <${Time} iso=${row.created_at} /></span></li>`}>
      ${totals?.reward_count ? html`<p id="address-reward-totals">${plural(totals.reward_count, "reward")}, ${kvp(totals.total_rewards)} in all.</p>` : null}
    <//>
  <//>`;
}

// --- search and the view's frame --------------------------------------------------------------

const SEARCH_ROUTES = {
  block: (result) => blockHref(result.height),
  transaction: (result) => txHref(result.hash),
  address: (result) => addressHref(result.address),
};

function SearchBox() {
  const [message, setMessage] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    const query = event.currentTarget.q.value.trim();
    setMessage("");
    setError("");
    if (!query) {
      setMessage("Type a block height, a block or transaction hash, or a kvp1 address.");
      return;
    }
    setBusy(true);
    try {
      const result = await context.api("GET", `/api/v1/chain/search?q=${encodeURIComponent(query)}`);
      location.hash = SEARCH_ROUTES[result.kind]?.(result) ?? "#/chain";
    } catch (failure) {
      if (failure.code === "not_found") setMessage(`Nothing found for “${query}”.`);
      else if (failure.code === "invalid_payload") {
        setMessage(`Nothing found for “${query}”: search for a block height, a 64-character block or transaction hash, or a kvp1 address.`);
      } else setError(`The search failed: ${failure.message}`);
    } finally {
      setBusy(false);
    }
  };
  return html`<form id="chain-search" role="search" aria-label="Search the chain" onSubmit=${submit}>
    <label for="chain-search-q">Search by block height, hash or address</label>
    <div class="search-row">
      <input id="chain-search-q" name="q" type="search" autocomplete="off" spellcheck="false" maxlength="100"
        placeholder="42, a block or tx hash, kvp1…" />
      <button type="submit" disabled=${busy}>Search</button>
    </div>
    <p id="chain-search-result" class="notice" role="status">${message}</p>
    <${Alert} text=${error} />
  </form>`;
}

function parsePath(path) {
  const [kind, ...rest] = path.split("/");
  const value = rest.join("/");
  if (!kind) return { page: "overview" };
  if (kind === "block" && value) return { page: "block", value };
  if (kind === "tx" && value) return { page: "tx", value };
  if (kind === "address" && value) return { page: "address", value };
  return { page: "unknown", value: path };
}

function Explorer() {
  useStore();
  const route = parsePath(store.path);
  const first = useRef(true);
  // A new page: its heading takes the focus (screen readers announce it), except on the first paint.
  useEffect(() => {
    if (first.current) { first.current = false; return; }
    // Not while the tab list has the focus: its arrow keys must keep working.
    const heading = document.getElementById("chain-page-title");
    const onTab = document.activeElement?.getAttribute("role") === "tab";
    if (heading && !onTab && !document.getElementById("tab-chain").hidden) heading.focus();
  }, [store.path]);
  let page;
  if (route.page === "overview") page = html`<${Overview} />`;
  else if (route.page === "block") page = html`<${BlockPage} key=${route.value} reference=${route.value} />`;
  else if (route.page === "tx") page = html`<${TxPage} key=${route.value} hash=${route.value} />`;
  else if (route.page === "address") page = html`<${AddressPage} key=${route.value} address=${route.value} />`;
  else page = NotFound({ title: "Page not found", text: `The explorer has no page “${route.value}”.` });
  return html`<div class="explorer"><${SearchBox} />${page}</div>`;
}

// --- the view contract --------------------------------------------------------------------------

/** Paint the explorer from REST, then follow the chain's blocks, transactions and mining rewards live. */
export async function start(ctx) {
  context = ctx;
  const section = document.getElementById("tab-chain");
  section.replaceChildren();
  render(html`<${Explorer} />`, section);
  markReady();
  // Back online: read again what failed meanwhile, so no stale error stays on screen.
  window.addEventListener("online", () => {
    if (store.errors.blocks) loadBlocks();
    if (store.errors.txs) loadTxs();
    if (store.errors.rewards) loadRewards();
    if (store.errors.halving) loadHalving();
    if (store.errors.burns) loadBurns();
  });
  loadHalving();
  loadBurns();
  await Promise.all([
    follow("chain:blocks", onBlockEvent, loadBlocks),
    follow("chain:transactions", onTxEvent, loadTxs),
    follow("chain:mining", onMiningEvent, loadRewards),
  ]);
}

/** "" is the overview; "block/<height or hash>", "tx/<hash>" and "address/<kvp1...>" are pages. */
export async function route(path) {
  await ready;
  if (store.path === path) return;
  store.path = path;
  changed();
}
