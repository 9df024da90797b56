// The Seller studio (#/studio, and #/studio/<datapod id> for one DataPod): upload a dataset with real
// progress, check the schema and sample the server inferred, publish and unpublish, edit the price and
// description, upload new versions, delete; and the figures (sales, escrow, payouts, downloads) with a
// chart, refreshed live when a sale completes or an escrow moves (docs/protocol.md, "/marketplace:
// DataPods" and "Sellers: figures, new versions, deletion").
import { html, render, useEffect, useRef } from "../vendor/preact-htm.module.js";
import uPlot from "../vendor/uPlot.esm.js";
import { api, HubError, upload } from "../hub.js";
import { formatAmount, formatDate, formatSize } from "../ui.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const LIST_PAGE = 50;
const ACCEPT = ".csv,.jsonl,.ndjson,text/csv,application/x-ndjson,application/jsonl";
const FIELD_LABELS = {
  file: "File", title: "Title", description: "Description", category: "Category", price_sui: "Price (SUI)", tags: "Tags",
};
const FIELD_HINTS = {
  price_sui: "Enter an amount in SUI such as 2 or 2.5: digits, at most 9 decimals, not negative.",
  category: "Use letters, digits, dots, dashes or underscores, without spaces.",
  tags: "Separate tags with commas: at most 20, each up to 40 characters.",
  file: "Send a CSV file with a header row (.csv) or JSON lines (.jsonl, .ndjson), in UTF-8.",
};
const BUCKETS = { day: "Daily, last 30 days", week: "Weekly, last 30 weeks" };
const PERIODS = { day: "Last 30 days", week: "Last 30 weeks" };
const CHART_HEIGHT = 220;
const bars = uPlot.paths.bars; // sales as bars, the other series as lines
const IDLE = { state: "idle", percent: 0, text: "", error: "" };

// Everything the view shows; update() merges a change and paints again.
const store = {
  me: null, path: null, live: "", liveError: "",
  pods: null, podsCursor: null, podsError: "", revenue: {}, listNotice: "", categories: [],
  sales: null, salesError: "", series: null, seriesError: "", bucket: "day", payouts: null, payoutsError: "",
  upload: IDLE,
  detail: null, // {id, pod, figures, series, versions, error, notice, busy, editError, editNotice, version: {...}}
};
let hub = null;

function update(patch) {
  Object.assign(store, patch);
  paint();
}

function updateDetail(id, patch) {
  if (store.detail?.id !== id) return; // an answer for a page that is no longer open
  update({ detail: { ...store.detail, ...patch } });
}

function paint() {
  const root = document.getElementById("studio-root");
  if (root) render(html`<${Studio} ...${store} />`, root);
}

// --- money: decimal strings, added exactly ----------------------------------------------------------------

const UNITS = 10n ** 9n; // NUMERIC(20, 9)

function units(amount) {
  const [whole, fraction = ""] = String(amount ?? "0").split(".");
  return BigInt(whole || "0") * UNITS + BigInt(fraction.padEnd(9, "0").slice(0, 9) || "0");
}

const amountText = (value) => formatAmount(`${value / UNITS}.${String(value % UNITS).padStart(9, "0")}`);
const total = (items, field) => amountText(items.reduce((sum, item) => sum + units(item[field]), 0n));

/** Whether two prices are the same amount ("2.5" and "2.500000000"); text that is no amount differs. */
function samePrice(a, b) {
  try {
    return units(a) === units(b);
  } catch {
    return false;
  }
}

const plural = (count, word) => `${count} ${word}${Number(count) === 1 ? "" : "s"}`;

// --- errors --------------------------------------------------------------------------------------------------

/** A server refusal as a sentence: what failed, which field, why, and what to do. */
function problem(action, error) {
  if (!(error instanceof HubError)) return `${action}: ${error?.message ?? error}`;
  if (error.code === "payload_too_large") {
    return `${action}: the file is too large (${error.message}). Split it, or upload a smaller file.`;
  }
  const label = FIELD_LABELS[error.field];
  const hint = error.code === "invalid_payload" ? FIELD_HINTS[error.field] : null;
  return [`${action}.`, label ? `${label}: ${error.message}.` : `${error.message}.`, hint].filter(Boolean).join(" ");
}

function publishProblem(error) {
  if (error instanceof HubError && error.code === "kyc_required") {
    return html`Not published: selling needs a verified identity (KYC). <a href="#/kyc">Submit your identity
      document in the KYC view</a>; once it is approved you can publish.`;
  }
  return problem("Not published", error);
}

// --- uploads with progress -----------------------------------------------------------------------------------

/** Progress of one upload as the view shows it. */
function progressOf(file, fraction, sent) {
  if (sent) {
    return { state: "processing", percent: 100,
      text: `Sent ${file.name}. The server is encrypting it and reading its columns…` };
  }
  const percent = fraction === null ? null : Math.floor(fraction * 100);
  return { state: "uploading", percent,
    text: `Uploading ${file.name} (${formatSize(file.size)})${percent === null ? "…" : `: ${percent}%`}` };
}

let uploadController = null;

async function uploadDataset(formElement) {
  const fields = new FormData(formElement);
  const file = fields.get("file");
  if (!(file instanceof File) || !file.name) {
    update({ upload: { ...IDLE, state: "failed", error: "Not uploaded. Choose a CSV or JSON-lines file first." } });
    return;
  }
  // The metadata before the file: the server reads the parts in order.
  const body = new FormData();
  for (const name of ["title", "description", "category", "price_sui", "tags"]) {
    const value = String(fields.get(name) ?? "");
    if (value.trim() || name === "title" || name === "category" || name === "price_sui") body.append(name, value);
  }
  body.append("file", file, file.name);
  uploadController = new AbortController();
  update({ upload: { ...IDLE, ...progressOf(file, 0, false), name: file.name } });
  try {
    const pod = await upload("/api/v1/datapods", body, {
      signal: uploadController.signal,
      onProgress(fraction, sent) {
        const next = progressOf(file, fraction, sent);
        if (next.percent === null) next.percent = store.upload.percent;
        if (store.upload.state !== "processing" || sent) update({ upload: { ...store.upload, ...next } });
      },
    });
    formElement.reset();
    update({ upload: { ...IDLE, state: "done", percent: 100, podId: pod.id,
      text: `Uploaded "${pod.title}" as a draft: check its columns and sample rows, then publish it.` } });
    loadPods();
    location.hash = `#/studio/${pod.id}`;
  } catch (error) {
    const cancelled = error.code === "aborted";
    update({ upload: { ...IDLE, state: cancelled ? "cancelled" : "failed", text: cancelled ? "Upload cancelled." : "",
      error: cancelled ? "" : problem(`Not uploaded (${file.name})`, error) } });
  } finally {
    uploadController = null;
  }
}

async function uploadVersion(id, formElement) {
  const file = new FormData(formElement).get("file");
  if (!(file instanceof File) || !file.name) {
    updateDetail(id, { version: { ...IDLE, state: "failed", error: "Choose the new file first." } });
    return;
  }
  const body = new FormData();
  body.append("file", file, file.name);
  updateDetail(id, { version: { ...IDLE, ...progressOf(file, 0, false) } });
  try {
    const version = await upload(`/api/v1/datapods/${id}/versions`, body, {
      onProgress(fraction, sent) {
        const next = progressOf(file, fraction, sent);
        if (next.percent === null) next.percent = store.detail?.version?.percent ?? 0;
        updateDetail(id, { version: { ...IDLE, ...next } });
      },
    });
    formElement.reset();
    const told = version.buyers_notified ? ` ${plural(version.buyers_notified, "buyer")} told.` : "";
    updateDetail(id, { version: { ...IDLE, state: "done", percent: 100,
      text: `Version ${version.version} is live (${formatSize(version.file_size)}): buyers now download this file.${told}` } });
    await loadDetail(id, { quiet: true });
  } catch (error) {
    updateDetail(id, { version: { ...IDLE, state: "failed", error: problem("The new version was not uploaded", error) } });
  }
}

// --- reading -------------------------------------------------------------------------------------------------

async function loadPods({ more = false } = {}) {
  const params = new URLSearchParams({ limit: String(LIST_PAGE) });
  if (more && store.podsCursor) params.set("cursor", store.podsCursor);
  try {
    const [page, sales] = await Promise.all([
      api("GET", `/api/v1/seller/datapods?${params}`),
      more ? null : api("GET", "/api/v1/me/sales/datapods?limit=100").catch(() => null),
    ]);
    const revenue = { ...(more ? store.revenue : {}) };
    for (const item of sales?.items ?? []) revenue[item.datapod_id] = item.revenue_net;
    const pods = more ? [...(store.pods ?? []), ...page.items.filter((pod) => !store.pods?.some((p) => p.id === pod.id))]
      : page.items;
    update({ pods, podsCursor: page.next_cursor ?? null, podsError: "", revenue });
  } catch (error) {
    update({ podsError: `Could not load your DataPods: ${error.message}` });
  }
}

function seriesPath(datapodId) {
  const params = new URLSearchParams({ bucket: store.bucket });
  if (datapodId) params.set("datapod_id", datapodId);
  return `/api/v1/me/sales/series?${params}`;
}

async function loadFigures() {
  await Promise.all([
    api("GET", "/api/v1/me/sales").then((sales) => update({ sales, salesError: "" }),
      (error) => update({ salesError: `Could not load your figures: ${error.message}` })),
    api("GET", seriesPath()).then((series) => update({ series, seriesError: "" }),
      (error) => update({ seriesError: `Could not load the chart: ${error.message}` })),
    api("GET", "/api/v1/me/sales/payouts?limit=20").then((page) => update({ payouts: page.items, payoutsError: "" }),
      (error) => update({ payoutsError: `Could not load your payouts: ${error.message}` })),
  ]);
}

async function loadCategories() {
  const facets = await api("GET", "/api/v1/datapods/facets").catch(() => null);
  const names = (facets?.categories ?? []).map((entry) => entry.category).filter(Boolean);
  update({ categories: [...new Set(names)] });
}

let overview = null;

/** The list page's data, read once however many callers ask at the same time. */
function loadOverview() {
  overview ??= Promise.all([loadPods(), loadFigures(), loadCategories()]).finally(() => { overview = null; });
  return overview;
}

async function loadDetailFigures(id) {
  const [figures, series] = await Promise.all([
    api("GET", `/api/v1/me/sales/datapods/${id}`).catch(() => null),
    api("GET", seriesPath(id)).catch(() => null),
  ]);
  updateDetail(id, { figures, series });
}

async function loadDetail(id, { quiet = false } = {}) {
  if (!quiet) update({ detail: { id, loading: true, version: IDLE } });
  try {
    const [pod, figures, series, versions] = await Promise.all([
      api("GET", `/api/v1/datapods/${id}`),
      api("GET", `/api/v1/me/sales/datapods/${id}`).catch((error) => error),
      api("GET", seriesPath(id)).catch(() => null),
      api("GET", `/api/v1/datapods/${id}/versions?limit=20`).catch(() => null),
    ]);
    const refused = figures instanceof HubError && ["forbidden", "not_found"].includes(figures.code);
    if (refused || (store.me && pod.seller?.id && pod.seller.id !== store.me.id)) {
      updateDetail(id, { loading: false, pod, foreign: true });
      return;
    }
    updateDetail(id, { loading: false, pod, figures: figures instanceof HubError ? null : figures, series,
      versions: versions?.items ?? [], error: quiet ? store.detail.error : "" });
  } catch (error) {
    updateDetail(id, { loading: false, missing: error.code === "not_found",
      error: error.code === "not_found" ? "" : `Could not load this DataPod: ${error.message}` });
  }
}

// --- changes -------------------------------------------------------------------------------------------------

async function setPublished(id, published) {
  updateDetail(id, { busy: true, error: "", notice: "" });
  try {
    const pod = await api("POST", `/api/v1/datapods/${id}/${published ? "publish" : "unpublish"}`);
    updateDetail(id, { busy: false, pod: { ...store.detail.pod, ...pod }, notice: published
      ? "Published: buyers find it in the Marketplace now."
      : "Withdrawn from the Marketplace. Buyers keep what they bought; publish it again at any time." });
    loadPods();
  } catch (error) {
    updateDetail(id, { busy: false, error: published ? publishProblem(error) : problem("Not withdrawn", error) });
  }
}

const tagList = (text) => [...new Set(String(text ?? "").split(",").map((tag) => tag.trim()).filter(Boolean))];

async function saveChanges(id, formElement) {
  const pod = store.detail.pod;
  const fields = Object.fromEntries(new FormData(formElement));
  const changes = {};
  if (fields.title.trim() !== pod.title) changes.title = fields.title.trim();
  if (fields.description !== (pod.description ?? "")) changes.description = fields.description;
  if (!samePrice(fields.price_sui.trim(), pod.price_sui)) changes.price_sui = fields.price_sui.trim();
  if (fields.category.trim() !== (pod.category ?? "")) changes.category = fields.category.trim();
  const tags = tagList(fields.tags);
  if (tags.join(",") !== (pod.tags ?? []).join(",")) changes.tags = tags;
  if (!Object.keys(changes).length) {
    updateDetail(id, { editError: "", editNotice: "Nothing changed: there is nothing to save." });
    return;
  }
  updateDetail(id, { busy: true, editError: "", editNotice: "" });
  try {
    const saved = await api("PATCH", `/api/v1/datapods/${id}`, changes);
    const what = Object.keys(changes).map((name) => FIELD_LABELS[name].replace(" (SUI)", "").toLowerCase()).join(", ");
    updateDetail(id, { busy: false, pod: { ...pod, ...saved }, editNotice: `Saved the new ${what}.${saved.published
      ? " The Marketplace shows it now." : ""}` });
    loadPods();
  } catch (error) {
    updateDetail(id, { busy: false, editError: problem("Not saved", error), invalidField: error.field ?? null });
    const input = error.field && formElement.elements[error.field];
    if (input?.focus) input.focus();
  }
}

async function deletePod(id) {
  const title = store.detail?.pod?.title ?? "the DataPod";
  updateDetail(id, { busy: true, error: "", notice: "" });
  try {
    await api("DELETE", `/api/v1/datapods/${id}`);
    update({ listNotice: `Deleted "${title}". Its buyers keep their copies, and its sales stay in your figures.` });
    location.hash = "#/studio";
  } catch (error) {
    updateDetail(id, { busy: false, error: problem("Not deleted", error) });
  }
}

// --- live: sales and escrow ----------------------------------------------------------------------------------

let refreshTimer = null;

/** Read the figures again (soon, once for a burst of events): there is no separate stats event. */
function refreshFigures() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    loadFigures();
    loadPods();
    if (store.detail?.id && store.detail.pod && !store.detail.foreign) loadDetail(store.detail.id, { quiet: true });
  }, 200);
}

const ESCROW_NEWS = {
  escrow_released: "released to you", escrow_settled: "paid out to your wallet", escrow_refunded: "refunded to the buyer",
  escrow_disputed: "disputed by the buyer",
};

function titleOf(datapodId, fallback) {
  return fallback ?? store.pods?.find((pod) => pod.id === datapodId)?.title ??
    (store.detail?.id === datapodId ? store.detail.pod?.title : null);
}

function onUserEvent(event) {
  const data = event.data ?? {};
  if (event.type === "sale_completed") {
    update({ live: `New sale: "${data.datapod_title ?? "a DataPod"}" for ${formatAmount(data.amount_sui)} KVP, held in escrow.` });
    refreshFigures();
  } else if (event.type.startsWith("escrow_")) {
    // Escrow events reach buyers too: only a sale of the seller's own DataPods is news here.
    const title = titleOf(data.datapod_id, null);
    const seller = title && !(event.type === "escrow_settled" && data.payee_id && data.payee_id !== store.me?.id);
    if (seller && ESCROW_NEWS[event.type]) {
      const amount = event.type === "escrow_settled" ? data.paid ?? data.amount_sui : data.amount_sui;
      update({ live: `The payment of ${formatAmount(amount)} KVP for "${title}" was ${ESCROW_NEWS[event.type]}.` });
    }
    refreshFigures();
  }
}

// --- the view's contract -------------------------------------------------------------------------------------

/** Follow the seller's sales and escrow on `user:<id>` (/purchases) and read the figures. */
export async function start(context) {
  hub = context.hub;
  update({ me: context.me });
  const subscription = hub.subscribe("/purchases", `user:${context.me.id}`, { onEvent: onUserEvent, onGap: refreshFigures });
  await Promise.all([
    loadOverview(),
    subscription.then(() => update({ liveError: "" }),
      (error) => update({ liveError: `Live updates are unavailable: ${error.message}` })),
  ]);
}

/** #/studio: the list and figures; #/studio/<datapod id>: one DataPod. */
export async function route(path) {
  const id = UUID.test(path) ? path.toLowerCase() : null;
  if (!path) {
    update({ path: "", detail: null });
    await loadOverview();
    return;
  }
  update({ path, listNotice: "" });
  if (!id) {
    update({ detail: { id: path, missing: true } });
    return;
  }
  if (store.upload.podId && store.upload.podId !== id && store.upload.state === "done") update({ upload: IDLE });
  await loadDetail(id);
  document.getElementById("studio-detail-title")?.focus({ preventScroll: true });
}

// --- components ----------------------------------------------------------------------------------------------

function Studio(props) {
  return html`
    <h2 id="studio-heading">Seller studio</h2>
    <p class="hint studio-intro">Sell your datasets: upload a file, check what the hub read from it, set a price and
      publish. Prices are in SUI; buyers pay the same amount in KVP, held in escrow until they confirm receipt
      (or for 3 days), then paid to your wallet.</p>
    <p class="studio-live" role="status" aria-live="polite" data-live>${props.live}</p>
    <p class="error" role="alert">${props.liveError}</p>
    <${UploadStatus} upload=${props.upload} />
    ${props.path ? html`<${Detail} ...${props} />` : html`<${Overview} ...${props} />`}`;
}

function UploadStatus({ upload, label = "Upload progress", className = "studio-upload-progress" }) {
  if (upload.state === "idle") return null;
  return html`
    <div class=${`studio-progress ${className}`} data-state=${upload.state}>
      ${upload.state === "failed" ? null : html`<progress max="100" value=${String(upload.percent ?? 0)}
        aria-label=${label}></progress>`}
      <span role="status" aria-live="polite">${upload.text}</span>
      ${upload.state === "uploading" && uploadController && className === "studio-upload-progress" ? html`
        <button type="button" onClick=${() => uploadController?.abort()}>Cancel upload</button>` : null}
      ${upload.state === "done" && upload.podId && store.path !== upload.podId ? html`
        <a class="studio-button" href=${`#/studio/${upload.podId}`}>Review and publish</a>` : null}
    </div>
    <p class=${`error ${className}-error`} role="alert">${upload.error}</p>`;
}

function Overview(props) {
  return html`
    <${UploadForm} upload=${props.upload} categories=${props.categories} />
    <${PodList} ...${props} />
    <section class="studio-panel" aria-labelledby="studio-figures-title">
      <h3 id="studio-figures-title">Your figures</h3>
      <${Totals} figures=${props.sales} error=${props.salesError} />
      <${SeriesFigure} series=${props.series} error=${props.seriesError} bucket=${props.bucket} idPrefix="studio-all" />
    </section>
    <${Payouts} payouts=${props.payouts} error=${props.payoutsError} />`;
}

function UploadForm({ upload, categories }) {
  const busy = upload.state === "uploading" || upload.state === "processing";
  const submit = (event) => {
    event.preventDefault();
    if (!busy) uploadDataset(event.currentTarget);
  };
  return html`
    <section class="studio-panel" aria-labelledby="studio-upload-title">
      <h3 id="studio-upload-title">Upload a dataset</h3>
      <p class="hint">A CSV file with a header row (.csv) or JSON lines (.jsonl, .ndjson), in UTF-8. It is encrypted as
        it arrives and stays a draft, seen by you alone, until you publish it.</p>
      <form class="studio-form" id="studio-upload-form" onSubmit=${submit} aria-describedby="studio-upload-title">
        <label>Dataset file <input type="file" name="file" accept=${ACCEPT} required /></label>
        <label>Title <input name="title" required maxlength="255" autocomplete="off" /></label>
        <label>Description <textarea name="description" rows="3" maxlength="10000"></textarea></label>
        <div class="studio-row">
          <label>Category <input name="category" required maxlength="50" list="studio-categories" autocomplete="off"
            placeholder="climate" /></label>
          <label>Price (SUI) <input name="price_sui" required inputmode="decimal" autocomplete="off" placeholder="1.5" /></label>
        </div>
        <label>Tags, separated by commas (optional) <input name="tags" autocomplete="off" placeholder="weather, daily" /></label>
        <datalist id="studio-categories">${categories.map((name) => html`<option value=${name}></option>`)}</datalist>
        <div class="actions"><button type="submit" disabled=${busy}>Upload</button></div>
      </form>
    </section>`;
}

function Status({ published }) {
  const status = published ? "published" : "draft";
  return html`<span class="studio-status" data-status=${status}>${published ? "Published" : "Draft"}</span>`;
}

function PodList({ pods, podsError, podsCursor, revenue, listNotice }) {
  let body;
  if (pods === null) body = podsError ? null : html`<p class="hint">Loading your DataPods…</p>`;
  else if (!pods.length) {
    body = html`<p class="empty">You have no DataPods yet. Upload a CSV or JSON-lines file above: it stays a draft
      until you publish it.</p>`;
  } else {
    body = html`
      <div class="scroll" tabindex="0" role="region" aria-labelledby="studio-pods-title">
        <table class="studio-table" id="studio-pods">
          <thead><tr><th scope="col">DataPod</th><th scope="col">Status</th><th scope="col">Price</th>
            <th scope="col">Sales</th><th scope="col">Revenue</th><th scope="col">Updated</th></tr></thead>
          <tbody>${pods.map((pod) => html`
            <tr key=${pod.id} data-datapod-id=${pod.id}>
              <th scope="row"><a href=${`#/studio/${pod.id}`}>${pod.title}</a></th>
              <td><${Status} published=${pod.published} /></td>
              <td class="number">${formatAmount(pod.price_sui)} SUI</td>
              <td class="number" data-sales>${pod.purchase_count ?? 0}</td>
              <td class="number">${revenue[pod.id] === undefined ? "–" : `${formatAmount(revenue[pod.id])} KVP`}</td>
              <td><time datetime=${pod.updated_at ?? pod.created_at}>${formatDate(pod.updated_at ?? pod.created_at)}</time></td>
            </tr>`)}</tbody>
        </table>
      </div>
      ${podsCursor ? html`<button type="button" onClick=${() => loadPods({ more: true })}>Show more DataPods</button>` : null}`;
  }
  return html`
    <section class="studio-panel" aria-labelledby="studio-pods-title">
      <h3 id="studio-pods-title">My DataPods</h3>
      <p class="studio-live" role="status">${listNotice}</p>
      <p class="error" role="alert">${podsError}</p>
      ${body}
    </section>`;
}

function Totals({ figures, error }) {
  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (!figures) return html`<p class="hint">Loading the figures…</p>`;
  const unsettled = units(figures.escrow_released_unsettled ?? "0") > 0n;
  return html`
    <dl class="studio-totals" aria-live="polite">
      <div><dt>Sales</dt><dd data-figure="sales">${figures.sales}</dd></div>
      <div><dt>Revenue</dt><dd data-figure="revenue">${formatAmount(figures.revenue_net)} KVP</dd></div>
      <div><dt>Pending in escrow</dt><dd data-figure="escrow">${formatAmount(figures.escrow_held)} KVP
        <small>${plural(figures.escrow_held_count, "sale")}</small></dd></div>
      ${unsettled ? html`<div><dt>Released, being paid</dt><dd data-figure="releasing">
        ${formatAmount(figures.escrow_released_unsettled)} KVP</dd></div>` : null}
      <div><dt>Paid out</dt><dd data-figure="paid">${formatAmount(figures.payouts_net)} KVP
        <small>${plural(figures.payouts_count, "payout")}</small></dd></div>
      <div><dt>Downloads</dt><dd data-figure="downloads">${figures.downloads}</dd></div>
      <div><dt>Views</dt><dd data-figure="views">${figures.views}</dd></div>
      <div><dt>Rating</dt><dd data-figure="rating">${figures.average_rating === null
        ? "No reviews yet" : `${figures.average_rating} / 5 (${plural(figures.reviews, "review")})`}</dd></div>
    </dl>`;
}

// --- the chart -------------------------------------------------------------------------------------------------

const SERIES = [
  { key: "sales", label: "Sales", scale: "count" },
  { key: "downloads", label: "Downloads", scale: "count" },
  { key: "escrow_released", label: "Payouts released (KVP)", scale: "kvp" },
];
const COLOURS = { sales: "#3656d8", downloads: "#1b6e3e", escrow_released: "#a34a00" };

function chartData(items) {
  return [
    items.map((item) => Date.parse(item.start) / 1000),
    ...SERIES.map(({ key, scale }) => items.map((item) => (scale === "kvp" ? Number(item[key]) : item[key]))), // plotted only
  ];
}

function chartOptions(width) {
  const fromZero = (self, min, max) => [0, Math.max(1, max)];
  // Half a bucket on either side, so the first and last days' bars are whole.
  const padded = (self, min, max) => {
    const times = self.data[0];
    const half = times.length > 1 ? (times[1] - times[0]) / 2 : 43200;
    return [min - half, max + half];
  };
  return {
    width, height: CHART_HEIGHT,
    legend: { show: false }, // the legend and the table below say the same in text
    scales: { x: { time: true, range: padded }, count: { range: fromZero }, kvp: { range: fromZero } },
    axes: [
      { stroke: "#1d2330", grid: { stroke: "#e3e6ee" } },
      { scale: "count", stroke: "#1d2330", grid: { stroke: "#e3e6ee" }, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        values: (self, ticks) => ticks.map(String), size: 40 },
      { scale: "kvp", side: 1, stroke: "#a34a00", grid: { show: false }, size: 50 },
    ],
    series: [{}, ...SERIES.map(({ key, label, scale }) => (key === "sales"
      ? { label, scale, stroke: COLOURS[key], fill: `${COLOURS[key]}b3`, width: 1, points: { show: false },
        paths: bars({ size: [0.6, 28] }) }
      : { label, scale, stroke: COLOURS[key], width: 2, dash: key === "downloads" ? [6, 4] : undefined,
        points: { size: 5, fill: COLOURS[key] } }))],
  };
}

function Chart({ items, label }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    const node = box.current;
    const observer = new ResizeObserver(() => {
      const width = node.clientWidth;
      if (plot.current && width && width !== plot.current.width) plot.current.setSize({ width, height: CHART_HEIGHT });
    });
    observer.observe(node);
    return () => {
      observer.disconnect();
      plot.current?.destroy();
      plot.current = null;
    };
  }, []);
  useEffect(() => {
    if (!items) return;
    const data = chartData(items);
    if (plot.current) plot.current.setData(data);
    else plot.current = new uPlot(chartOptions(box.current.clientWidth || 300), data, box.current);
  }, [items]);
  return html`<div class="studio-chart" ref=${box} role="img" aria-label=${label}></div>`;
}

function SeriesFigure({ series, error, bucket, idPrefix }) {
  if (error) return html`<p class="error" role="alert">${error}</p>`;
  if (!series) return html`<p class="hint">Loading the chart…</p>`;
  const items = series.items ?? [];
  const sales = items.reduce((sum, item) => sum + item.sales, 0);
  const downloads = items.reduce((sum, item) => sum + item.downloads, 0);
  const summary = `${PERIODS[series.bucket] ?? "This period"}: ${plural(sales, "sale")} bringing ${
    total(items, "revenue_net")} KVP, ${total(items, "escrow_released")} KVP of payouts released, ${
    plural(downloads, "download")}.`;
  const active = items.filter((item) => item.sales || item.downloads || units(item.escrow_released) > 0n);
  const when = (item) => (series.bucket === "week" ? `Week of ${formatDate(item.start)}` : formatDate(item.start));
  return html`
    <figure class="studio-figure" aria-labelledby=${`${idPrefix}-caption`}>
      <div class="studio-chart-head">
        <figcaption id=${`${idPrefix}-caption`} aria-live="polite" data-summary>${summary}</figcaption>
        <label>Period <select value=${bucket} onChange=${(event) => changeBucket(event.currentTarget.value)}>
          ${Object.entries(BUCKETS).map(([value, label]) => html`<option value=${value}>${label}</option>`)}
        </select></label>
      </div>
      <${Chart} items=${items} label=${`Chart of sales, downloads and payouts. ${summary}`} />
      <ul class="studio-legend" aria-hidden="true">
        ${SERIES.map(({ key, label }) => html`<li><span class=${`swatch swatch-${key}`}></span>${label}</li>`)}
      </ul>
      <details>
        <summary>The same figures as a table</summary>
        ${active.length ? html`
          <div class="scroll" tabindex="0" role="region" aria-label="Figures by period">
            <table class="studio-table">
              <thead><tr><th scope="col">${series.bucket === "week" ? "Week" : "Day"}</th><th scope="col">Sales</th>
                <th scope="col">Revenue</th><th scope="col">Payouts released</th><th scope="col">Downloads</th></tr></thead>
              <tbody>${active.map((item) => html`<tr key=${item.start}>
                <th scope="row"><time datetime=${item.start}>${when(item)}</time></th>
                <td class="number">${item.sales}</td><td class="number">${formatAmount(item.revenue_net)} KVP</td>
                <td class="number">${formatAmount(item.escrow_released)} KVP</td><td class="number">${item.downloads}</td>
              </tr>`)}</tbody>
            </table>
          </div>
          <p class="hint">Periods without sales, payouts or downloads are left out.</p>`
          : html`<p class="empty">No sales, payouts or downloads in this period yet.</p>`}
      </details>
    </figure>`;
}

function changeBucket(bucket) {
  update({ bucket });
  api("GET", seriesPath()).then((series) => update({ series, seriesError: "" }),
    (error) => update({ seriesError: `Could not load the chart: ${error.message}` }));
  if (store.detail?.pod) loadDetailFigures(store.detail.id);
}

function Payouts({ payouts, error }) {
  let body;
  if (error) body = null;
  else if (!payouts) body = html`<p class="hint">Loading your payouts…</p>`;
  else if (!payouts.length) {
    body = html`<p class="empty">No payouts yet. A sale's payment is paid to your wallet once the buyer confirms receipt,
      or 3 days after the sale.</p>`;
  } else {
    body = html`
      <div class="scroll" tabindex="0" role="region" aria-labelledby="studio-payouts-title">
        <table class="studio-table" id="studio-payouts">
          <thead><tr><th scope="col">Paid</th><th scope="col">DataPod</th><th scope="col">Net</th><th scope="col">Fee</th>
            <th scope="col">Transaction</th></tr></thead>
          <tbody>${payouts.map((payout) => html`<tr key=${payout.escrow_id}>
            <td><time datetime=${payout.settled_at}>${formatDate(payout.settled_at)}</time></td>
            <th scope="row"><a href=${`#/studio/${payout.datapod_id}`}>${payout.datapod_title ?? "DataPod"}</a></th>
            <td class="number">${formatAmount(payout.net)} KVP</td><td class="number">${formatAmount(payout.fee)} KVP</td>
            <td>${payout.settlement_tx_hash ? html`<a href=${`#/chain/tx/${payout.settlement_tx_hash}`}>
              <code>${payout.settlement_tx_hash.slice(0, 12)}…</code></a>` : "–"}</td>
          </tr>`)}</tbody>
        </table>
      </div>`;
  }
  return html`
    <section class="studio-panel" aria-labelledby="studio-payouts-title">
      <h3 id="studio-payouts-title">Payouts</h3>
      <p class="error" role="alert">${error}</p>
      ${body}
    </section>`;
}

// --- one DataPod ---------------------------------------------------------------------------------------------

function Detail({ detail, bucket }) {
  const back = html`<a class="studio-button studio-back" href="#/studio">← All my DataPods</a>`;
  if (!detail || detail.loading) return html`${back}<p class="hint" role="status">Loading the DataPod…</p>`;
  if (detail.missing) {
    return html`${back}<h3 id="studio-detail-title" tabindex="-1">No such DataPod</h3>
      <p class="empty">This address names no DataPod of yours: it may have been deleted.</p>`;
  }
  if (!detail.pod) return html`${back}<p class="error" role="alert">${detail.error}</p>`;
  const { pod } = detail;
  if (detail.foreign) {
    return html`${back}<h3 id="studio-detail-title" tabindex="-1">${pod.title}</h3>
      <p class="empty">This DataPod is another seller's. <a href=${`#/datapods/${pod.id}`}>Open it in the Marketplace</a>.</p>`;
  }
  const id = pod.id;
  return html`
    ${back}
    <article class="studio-detail" key=${id} aria-labelledby="studio-detail-title">
      <header class="studio-detail-head">
        <h3 id="studio-detail-title" tabindex="-1">${pod.title}</h3>
        <${Status} published=${pod.published} />
      </header>
      <p class="studio-live" role="status" aria-live="polite">${detail.notice}</p>
      <p class="error" role="alert">${detail.error}</p>
      <div class="actions">
        ${pod.published
          ? html`<button type="button" disabled=${detail.busy} onClick=${() => setPublished(id, false)}>Unpublish</button>
            <a class="studio-button" href=${`#/datapods/${id}`}>View in the Marketplace</a>`
          : html`<button type="button" class="primary" disabled=${detail.busy} onClick=${() => setPublished(id, true)}>Publish</button>`}
      </div>
      ${pod.published ? null : html`<p class="hint">A draft: only you see it. Check the columns and sample rows the hub
        read from your file below, then publish to put it on the Marketplace.</p>`}
      <${Facts} pod=${pod} />
      <${Dataset} pod=${pod} />
      <${EditForm} detail=${detail} />
      <${VersionForm} detail=${detail} />
      <section class="studio-panel" aria-labelledby="studio-pod-figures-title">
        <h3 id="studio-pod-figures-title">Figures of this DataPod</h3>
        <${Totals} figures=${detail.figures} error=${detail.figures ? "" : "Could not load this DataPod's figures."} />
        <${SeriesFigure} series=${detail.series} error=${detail.series ? "" : "Could not load the chart."} bucket=${bucket}
          idPrefix="studio-pod" />
      </section>
      <${Versions} versions=${detail.versions} />
      <${DeleteControl} pod=${pod} busy=${detail.busy} />
    </article>`;
}

function Facts({ pod }) {
  const schema = pod.schema;
  return html`
    <dl class="facts studio-facts">
      <dt>Price</dt><dd data-fact="price">${formatAmount(pod.price_sui)} SUI</dd>
      <dt>Category</dt><dd>${pod.category ?? "–"}</dd>
      <dt>Tags</dt><dd>${pod.tags?.length ? pod.tags.join(", ") : "none"}</dd>
      <dt>Description</dt><dd data-fact="description">${pod.description || "none yet"}</dd>
      <dt>File</dt><dd>${[schema?.format?.toUpperCase() ?? pod.file_type, formatSize(pod.file_size),
        schema ? `${plural(schema.row_count ?? 0, "row")}, ${plural(schema.column_count ?? schema.columns?.length ?? 0, "column")}` : null]
        .filter(Boolean).join(" · ")}</dd>
      <dt>Sales</dt><dd data-fact="sales">${pod.purchase_count ?? 0}</dd>
      <dt>Uploaded</dt><dd><time datetime=${pod.created_at}>${formatDate(pod.created_at)}</time></dd>
    </dl>`;
}

const cellText = (value) => (value === undefined || value === null ? ""
  : typeof value === "object" ? JSON.stringify(value) : String(value));

function Dataset({ pod }) {
  const columns = pod.schema?.columns ?? [];
  const sample = pod.sample_data ?? [];
  const names = columns.length ? columns.map((column) => column.name) : [...new Set(sample.flatMap(Object.keys))];
  return html`
    <section class="studio-panel" aria-labelledby="studio-schema-title">
      <h3 id="studio-schema-title">Inferred schema</h3>
      ${columns.length ? html`
        <div class="scroll" tabindex="0" role="region" aria-labelledby="studio-schema-title">
          <table class="studio-table" id="studio-schema">
            <thead><tr><th scope="col">Column</th><th scope="col">Type</th><th scope="col">Empty values</th></tr></thead>
            <tbody>${columns.map((column) => html`<tr key=${column.name}>
              <th scope="row">${column.name}</th><td>${column.type}</td><td class="number">${column.null_count ?? 0}</td>
            </tr>`)}</tbody>
          </table>
        </div>` : html`<p class="empty">No schema was inferred for this file.</p>`}
      <h3 id="studio-sample-title">Sample rows</h3>
      ${sample.length ? html`
        <p class="hint">The first ${plural(sample.length, "row")}, as buyers see them before buying.</p>
        <div class="scroll" tabindex="0" role="region" aria-labelledby="studio-sample-title">
          <table class="studio-table" id="studio-sample">
            <thead><tr>${names.map((name) => html`<th scope="col">${name}</th>`)}</tr></thead>
            <tbody>${sample.map((row, index) => html`<tr key=${index}>
              ${names.map((name) => html`<td>${cellText(row[name])}</td>`)}</tr>`)}</tbody>
          </table>
        </div>` : html`<p class="empty">The file has no rows to show.</p>`}
    </section>`;
}

function EditForm({ detail }) {
  const { pod } = detail;
  const submit = (event) => {
    event.preventDefault();
    saveChanges(pod.id, event.currentTarget);
  };
  const invalid = (name) => (detail.editError && detail.invalidField === name ? "true" : undefined);
  return html`
    <section class="studio-panel" aria-labelledby="studio-edit-title">
      <h3 id="studio-edit-title">Edit</h3>
      <form class="studio-form" id="studio-edit-form" onSubmit=${submit} novalidate>
        <label>Title <input name="title" defaultValue=${pod.title} maxlength="255" aria-invalid=${invalid("title")} /></label>
        <label>Description <textarea name="description" rows="3" defaultValue=${pod.description ?? ""}
          aria-invalid=${invalid("description")}></textarea></label>
        <div class="studio-row">
          <label>Price (SUI) <input name="price_sui" inputmode="decimal" autocomplete="off"
            defaultValue=${formatAmount(pod.price_sui)} aria-invalid=${invalid("price_sui")} /></label>
          <label>Category <input name="category" defaultValue=${pod.category ?? ""} list="studio-categories"
            aria-invalid=${invalid("category")} /></label>
        </div>
        <label>Tags, separated by commas <input name="tags" defaultValue=${(pod.tags ?? []).join(", ")}
          aria-invalid=${invalid("tags")} /></label>
        <div class="actions"><button type="submit" disabled=${detail.busy}>Save changes</button></div>
        <p class="studio-live" role="status" aria-live="polite" data-edit-notice>${detail.editNotice}</p>
        <p class="error" role="alert" data-edit-error>${detail.editError}</p>
      </form>
    </section>`;
}

function VersionForm({ detail }) {
  const version = detail.version ?? IDLE;
  const busy = version.state === "uploading" || version.state === "processing";
  const submit = (event) => {
    event.preventDefault();
    if (!busy) uploadVersion(detail.id, event.currentTarget);
  };
  return html`
    <section class="studio-panel" aria-labelledby="studio-version-title">
      <h3 id="studio-version-title">Upload a new version</h3>
      <p class="hint">Replace the file: buyers who already bought it get the new version, and the schema and sample
        above follow it. Same formats as an upload.</p>
      <form class="studio-form" id="studio-version-form" onSubmit=${submit}>
        <label>New file <input type="file" name="file" accept=${ACCEPT} required /></label>
        <div class="actions"><button type="submit" disabled=${busy}>Upload new version</button></div>
      </form>
      <${UploadStatus} upload=${version} label="New version upload progress" className="studio-version-progress" />
    </section>`;
}

function Versions({ versions }) {
  if (!versions?.length) return null;
  return html`
    <section class="studio-panel" aria-labelledby="studio-versions-title">
      <h3 id="studio-versions-title">Versions</h3>
      <ol class="rows studio-versions" reversed>
        ${versions.map((version) => html`<li key=${version.version}>
          ${`Version ${version.version} · ${formatSize(version.file_size)} · ${version.file_type} · `}<time
            datetime=${version.created_at}>${formatDate(version.created_at)}</time></li>`)}
      </ol>
    </section>`;
}

function DeleteControl({ pod, busy }) {
  const dialog = useRef(null);
  const open = () => {
    dialog.current.returnValue = "";
    dialog.current.showModal();
  };
  const closed = () => {
    if (dialog.current.returnValue === "delete") deletePod(pod.id);
  };
  return html`
    <section class="studio-panel studio-danger" aria-labelledby="studio-delete-title">
      <h3 id="studio-delete-title">Delete</h3>
      <p class="hint">Deleting takes it off the Marketplace and out of this list for good. Buyers keep what they bought.
        To take it off sale for a while, unpublish it instead.</p>
      <button type="button" class="danger" disabled=${busy} onClick=${open}>Delete this DataPod…</button>
      <dialog ref=${dialog} class="studio-dialog" aria-labelledby="studio-delete-dialog-title"
        aria-describedby="studio-delete-dialog-text" onClose=${closed}>
        <form method="dialog">
          <h2 id="studio-delete-dialog-title">Delete "${pod.title}"?</h2>
          <p id="studio-delete-dialog-text">It leaves the Marketplace and your list, and cannot be restored. Its buyers
            keep their copies and its sales stay in your figures.</p>
          <div class="actions">
            <button type="submit" value="cancel" autofocus>Keep it</button>
            <button type="submit" value="delete" class="danger">Delete for good</button>
          </div>
        </form>
      </dialog>
    </section>`;
}

paint(); // "Loading…" until the first answers come
