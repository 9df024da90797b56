// The dashboard: sign-in, then one tab per namespace, all live through hub.js.
import { api, Hub, HubError, session, sessionEvents } from "./hub.js";
import { $, datapodHref, element, formatAmount, formatDate, formatSize, upsert } from "./ui.js";
import * as account from "./views/account.js";
import * as assistant from "./views/assistant.js";
import * as chain from "./views/chain.js";
import * as dao from "./views/dao.js";
import * as games from "./views/games.js";
import * as kyc from "./views/kyc.js";
import * as nfts from "./views/nfts.js";
import * as studio from "./views/studio.js";
import { addressOf, BackupError, createBackup, generateWalletKey, openBackup, parseBackup } from "./wallet-backup.js";

const hub = new Hub({ onState: showConnectionState });
window.hub = hub; // a handle for the browser tests and for debugging from the console
let me = null;

// An outage shows a banner (not only the badge) until the hub is back; then a short "reconnected"
// and the page re-reads what failed meanwhile, so no stale "Failed to fetch" stays on screen.
const connection = { down: false, timer: null };

function showBanner(kind, text) {
  const banner = $("#offline-banner");
  clearTimeout(connection.timer);
  banner.dataset.kind = kind;
  banner.textContent = text;
  banner.hidden = false;
  if (kind === "online") connection.timer = setTimeout(() => { banner.hidden = true; }, 5000);
}

function showConnectionState(state) {
  const badge = $("#connection");
  badge.dataset.state = state;
  badge.textContent = state;
  if (state === "reconnecting" && me) {
    connection.down = true;
    showBanner("offline", "Connection lost: reconnecting… Live updates resume by themselves, with what was missed.");
  } else if ((state === "recovered" || state === "connected") && connection.down) {
    connection.down = false;
    showBanner("online", "Reconnected: live updates are back, and what was missed has been caught up.");
    retryFailed();
  }
}

window.addEventListener("offline", () => showBanner("offline", "You are offline: the page reconnects when the network is back."));
window.addEventListener("online", () => { if (!connection.down) showBanner("online", "Back online."); retryFailed(); });

/** Re-run what failed while the hub was unreachable: its error goes once it succeeds. */
function retryFailed() {
  if ($("#market-error").textContent) loadDatapods().catch(() => {});
  if (me && $("#wallet-error").textContent) {
    loadWallet().then(() => { $("#wallet-error").textContent = ""; }, () => {});
  }
}


// --- sign-in ------------------------------------------------------------------------------

async function signIn(path, form) {
  const body = Object.fromEntries(new FormData(form));
  try {
    const data = await api("POST", path, body);
    session.store(data);
    await start();
  } catch (error) {
    $("#sign-in-error").textContent = error instanceof HubError ? error.message : String(error);
  }
}

$("#login-form").addEventListener("submit", (event) => { event.preventDefault(); signIn("/api/v1/auth/login", event.target); });
$("#register-form").addEventListener("submit", (event) => { event.preventDefault(); signIn("/api/v1/auth/register", event.target); });
$("#sign-out").addEventListener("click", async () => {
  hub.close(); // this tab's own sockets need no signed_out
  await api("POST", "/api/v1/auth/logout").catch(() => {});
  session.clear();
  forgetViewState();
  location.reload();
});

// Why a tab shows the sign-in form again; kept across the reload that clears the old user's page.
const SIGNED_OUT_KEY = "hub.signed_out";
const SIGNED_OUT_ELSEWHERE = "You were signed out: this account signed out in another tab or window.";
const SIGNED_OUT_TEXT = {
  logged_out: SIGNED_OUT_ELSEWHERE,
  elsewhere: SIGNED_OUT_ELSEWHERE,
  revoked: "You were signed out: this session was ended. Sign in again.",
  expired: "Your session expired. Sign in again.",
};

// The session ended (logout elsewhere, revocation, expiry): a fresh page in the signed-out state,
// so nothing of this user stays on screen and no socket tries to reconnect.
sessionEvents.addEventListener("signedout", (event) => {
  if (!me) return;
  me = null;
  hub.close();
  sessionStorage.setItem(SIGNED_OUT_KEY, event.detail.reason);
  forgetViewState();
  location.reload();
});
// Signed in from another tab while this one shows the form: follow it.
sessionEvents.addEventListener("token", () => { if (!me && !starting) start(); });

/** Drop what views kept for this tab ("hub.view." keys): the next user of the tab starts afresh. */
function forgetViewState() {
  for (const key of Object.keys(sessionStorage)) if (key.startsWith("hub.view.")) sessionStorage.removeItem(key);
}

// --- tabs ---------------------------------------------------------------------------------

// The WAI-ARIA tabs pattern: one tab in the Tab order, arrow keys (and Home/End) move between
// them and open the view. Every view has a URL (#/<view>, #/datapods/<id>): links, back and reload.

// The views in static/views/: each exports start(context), run once signed in, and may export
// route(path), given what follows "#/<view>/" whenever its address opens (reload, link, back);
// route may run before start has finished. A view may also export signedOut({ api }), run when the
// page shows the sign-in form (to offer another way in, say).
const VIEW_MODULES = { studio, assistant, chain, games, dao, nfts, kyc, account };
const VIEWS = ["marketplace", "purchases", ...Object.keys(VIEW_MODULES)];
const VIEW_NAMES = { marketplace: "Marketplace", purchases: "Purchases", studio: "Seller studio", assistant: "Assistant",
  chain: "Explorer", games: "Games", dao: "DAO", nfts: "NFTs", kyc: "KYC", account: "Account" };
const tabButtons = () => [...document.querySelectorAll('nav [role="tab"]')].filter((tab) => !tab.hidden);

function showTab(name) {
  for (const tab of document.querySelectorAll('nav [role="tab"]')) {
    const selected = tab.dataset.tab === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    if (selected) tab.scrollIntoView({ block: "nearest", inline: "nearest" });
  }
  for (const panel of document.querySelectorAll(".tab")) panel.hidden = panel.id !== `tab-${name}`;
}

/** Go to a view: a new history entry (a click), or in place of the current one (arrow keys). */
function openTab(name, { replace = false } = {}) {
  const hash = `#/${name}`;
  if (location.hash === hash) route();
  else if (replace) location.replace(hash);
  else location.hash = hash;
}

for (const button of document.querySelectorAll('nav [role="tab"]')) {
  button.addEventListener("click", () => openTab(button.dataset.tab));
}
$("nav").addEventListener("keydown", (event) => {
  const tabs = tabButtons();
  const index = tabs.indexOf(document.activeElement);
  if (index < 0) return;
  const next = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  tab.focus();
  openTab(tab.dataset.tab, { replace: true });
});

// --- marketplace --------------------------------------------------------------------------


function cardRating(pod) {
  const rating = Number(pod.average_rating ?? 0);
  return rating > 0 ? `★ ${rating.toFixed(1)}` : "No ratings yet";
}

function datapodCard(pod) {
  const seller = pod.seller?.name || pod.seller?.username;
  const facts = [
    pod.category, seller ? `by ${seller}` : null, cardRating(pod), pod.row_count != null ? `${pod.row_count} rows` : null,
    formatSize(pod.file_size), `sold ${pod.purchase_count ?? 0}`,
  ].filter(Boolean);
  const card = element("li", { dataset: { datapodId: pod.id } },
    element("h4", {}, element("a", { href: datapodHref(pod.id) }, pod.title ?? pod.id)),
    element("p", { class: "price" }, `${formatAmount(pod.price_sui)} SUI`),
    element("p", {}, pod.description ?? ""),
    element("p", { class: "meta" }, facts.join(" · "),
      pod.created_at ? element("span", {}, " · ", element("time", { datetime: pod.created_at }, formatDate(pod.created_at))) : null));
  card.append(...buyControls(pod));
  return card;
}

// A purchase that gives (or is about to give) the buyer the dataset: the pod is theirs, no second Buy.
const OWNING_STATUSES = ["pending_payment", "processing", "completed"];

/** The signed-in user's purchase of a pod that makes it theirs, if any. */
const ownPurchaseOf = (podId) => [...purchases.values()].find((p) => p.datapod_id === podId && OWNING_STATUSES.includes(p.status));

/**
 * What a signed-in user can do with a pod: Buy, or "Owned · Download" once bought (progress while
 * the purchase runs); nothing for its seller or a visitor. Kept in a box that ownership changes redraw.
 */
function buyControls(pod) {
  const box = element("div", { class: "buy-area", dataset: { datapodId: pod.id } });
  box.pod = pod;
  fillBuyControls(box);
  return [box];
}

function fillBuyControls(box) {
  const { pod } = box;
  if (!me || pod.seller?.id === me.id) { box.replaceChildren(); return; }
  const error = element("p", { class: "error", role: "alert" });
  const owned = ownPurchaseOf(pod.id);
  if (owned) {
    const state = owned.status === "completed" ? "Owned" : "Purchase in progress";
    box.replaceChildren(element("span", { class: "owned" }, state));
    if (owned.status === "completed") {
      const button = element("button", { type: "button", class: "download", "aria-label": `Download ${pod.title ?? "this DataPod"}` }, "Download");
      button.addEventListener("click", () => download(owned.id).catch((failure) => { error.textContent = failure.message; }));
      box.append(" · ", button, error);
    } else box.append(" · ", element("a", { href: "#/purchases" }, "see its progress"));
    return;
  }
  const buy = element("button", { type: "button", class: "buy", "aria-label": `Buy ${pod.title ?? "this DataPod"}` }, "Buy");
  buy.addEventListener("click", async () => {
    buy.disabled = true;
    error.textContent = "";
    try {
      await buyDatapod(pod);
    } catch (failure) {
      error.textContent = failure.message;
    } finally {
      buy.disabled = false;
    }
  });
  box.replaceChildren(buy, error);
}

/** Redraw every Buy box on screen (cards and the DataPod page): a purchase started, ended or loaded. */
function refreshBuyControls() {
  for (const box of document.querySelectorAll(".buy-area")) if (box.pod) fillBuyControls(box);
}

const MARKET_PAGE = 20;
const market = { cursor: null, total: null, request: 0 };

/** The search form as the API's query parameters (docs/protocol.md, search_datapods). */
function marketFilters(form = $("#market-search")) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    if (!value || name === "sort") continue;
    params.set(name, String(value).trim());
  }
  return params;
}

function showCategories(facets) {
  const select = $("#market-search").elements.category;
  const chosen = select.value;
  const options = (facets?.categories ?? []).filter((entry) => entry.category)
    .map((entry) => element("option", { value: entry.category }, `${entry.category} (${entry.count})`));
  if (chosen && !options.some((option) => option.value === chosen)) options.push(element("option", { value: chosen }, chosen));
  select.replaceChildren(element("option", { value: "" }, "All categories"), ...options);
  select.value = chosen;
}

function showMarketCount() {
  const shown = $("#datapods").children.length;
  const total = market.total ?? shown;
  $("#market-count").textContent = total === 0 ? "No DataPods found."
    : `${total} DataPod${total === 1 ? "" : "s"}${shown < total ? ` · showing ${shown}` : ""}`;
  $("#market-empty").hidden = shown > 0;
  $("#market-more").hidden = !market.cursor;
}

/** The first page of the search (or the next one, `more`), with the result count and the categories. */
async function loadDatapods({ more = false } = {}) {
  const form = $("#market-search");
  const filters = marketFilters(form);
  const params = new URLSearchParams(filters);
  const [sort, order] = form.elements.sort.value.split(":");
  params.set("sort", sort);
  if (order) params.set("order", order);
  params.set("limit", String(MARKET_PAGE));
  if (more && market.cursor) params.set("cursor", market.cursor);
  const withoutCategory = new URLSearchParams(filters);
  withoutCategory.delete("category");
  const request = ++market.request; // a slow answer to an older search must not overwrite a newer one
  const list = $("#datapods");
  try {
    const [page, counted, categories] = await Promise.all([
      api("GET", `/api/v1/datapods?${params}`),
      more ? null : api("GET", `/api/v1/datapods/facets?${filters}`),
      more ? null : api("GET", `/api/v1/datapods/facets?${withoutCategory}`).catch(() => null),
    ]);
    if (request !== market.request) return;
    $("#market-error").textContent = "";
    const cards = (page.items ?? []).filter((pod) => !more || !list.querySelector(`[data-key="${CSS.escape(pod.id)}"]`))
      .map((pod) => {
        const card = datapodCard(pod);
        card.dataset.key = pod.id;
        card.pod = pod; // live updates (a sale, an edit) merge into what the list showed
        return card;
      });
    if (more) list.append(...cards);
    else list.replaceChildren(...cards);
    market.cursor = page.next_cursor ?? null;
    if (counted) market.total = counted.total;
    if (categories) showCategories(categories);
    showMarketCount();
    if (page.fuzzy && list.children.length) $("#market-count").textContent += " · showing titles close to your search";
  } catch (error) {
    if (request !== market.request) return;
    $("#market-error").textContent = `Could not load datapods: ${error.message}`;
  }
}

$("#market-search").addEventListener("submit", (event) => { event.preventDefault(); loadDatapods(); });
$("#market-search").elements.sort.addEventListener("change", () => loadDatapods());
$("#market-search").elements.category.addEventListener("change", () => loadDatapods());
$("#market-reset").addEventListener("click", () => { $("#market-search").reset(); loadDatapods(); });
$("#market-more").addEventListener("click", async () => {
  const button = $("#market-more");
  button.disabled = true;
  try {
    await loadDatapods({ more: true });
  } finally {
    button.disabled = false;
  }
});

/** Merge one `market` event into the list: a publication adds a card, an unpublication removes one. */
function applyMarketEvent(event) {
  const data = event.data.datapod ?? event.data;
  const id = data.id ?? data.datapod_id;
  const existing = $("#datapods").querySelector(`[data-key="${CSS.escape(id)}"]`);
  if (event.type === "datapod_unpublished") {
    if (existing) {
      existing.remove();
      if (market.total) market.total -= 1;
      showMarketCount();
    }
    return;
  }
  // Only a publication adds a card: a sale or a review of a pod the list does not show stays out.
  if (!existing && event.type !== "datapod_published") return;
  const changes = event.type === "datapod_updated" ? data.changes : data;
  const merged = { ...(existing?.pod ?? {}), ...changes, id };
  const card = upsert($("#datapods"), id, datapodCard(merged), { prepend: !existing });
  card.pod = merged;
  if (!existing) {
    market.total = (market.total ?? 0) + 1;
    showMarketCount();
  }
}

async function watchMarket() {
  // Subscribed before the list is read, so nothing published meanwhile is missed; events that come
  // before the list are applied after it (each is safe to apply to a list that already has it).
  let pending = [];
  const subscription = hub.subscribe("/marketplace", "market", {
    onGap: loadDatapods,
    onEvent(event) {
      if (pending) pending.push(event);
      else applyMarketEvent(event);
    },
  });
  subscription.catch(() => {}); // awaited below, after the list: no "unhandled" report meanwhile
  await loadDatapods();
  const early = pending;
  pending = null;
  early.forEach(applyMarketEvent);
  await subscription;
}

// --- the DataPod page ---------------------------------------------------------------------
// A hash route (#/datapods/<id>; the older #datapod/<id> still opens) inside the Marketplace tab, so
// a reload or a shared link reopens it. While it is open a signed-in page watches `datapod:<id>`:
// the server counts it as a viewer until it leaves. Signed out, the page reads it over REST only.

const DATAPOD_ROUTE = /^#(?:\/datapods\/|datapod\/)([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$/i;
const REVIEW_PAGE = 10;
const detail = { id: null, pod: null, pending: [], nextCursor: null, purchase: null };

const cellText = (value) => (value === undefined || value === null ? ""
  : typeof value === "object" ? JSON.stringify(value) : String(value));

function ratingText(pod) {
  const count = Number(pod.review_count ?? 0);
  if (!count) return "No reviews yet";
  return `${pod.average_rating} / 5 from ${count} review${count === 1 ? "" : "s"}`;
}

/** The seller as a profile line: name, username, and their rating as a seller. */
function sellerText(seller) {
  if (!seller) return "unknown";
  const who = seller.name && seller.name !== seller.username ? `${seller.name} (@${seller.username})` : seller.username ?? seller.name;
  const rating = Number(seller.average_rating ?? 0);
  return rating > 0 ? `${who} · ★ ${rating.toFixed(1)} as a seller` : `${who} · no seller rating yet`;
}

function showPod(pod) {
  detail.pod = pod;
  $("#datapod-title").textContent = pod.title ?? pod.id;
  $("#datapod-description").textContent = pod.description ?? "";
  $("#datapod-category").textContent = pod.category ?? "–";
  $("#datapod-price").textContent = `${formatAmount(pod.price_sui)} SUI`;
  $("#datapod-seller").textContent = sellerText(pod.seller);
  $("#datapod-size").textContent = formatSize(pod.file_size) ?? "–";
  $("#datapod-tags").replaceChildren(...(pod.tags?.length ? pod.tags.map((tag) => element("span", { class: "tag" }, tag)) : ["none"]));
  $("#datapod-updated").textContent = formatDate(pod.updated_at ?? pod.created_at) ?? "–";
  $("#datapod-rating").textContent = ratingText(pod);
  $("#datapod-sold").textContent = String(pod.purchase_count ?? 0);
}

function showDataset(pod) {
  const columns = pod.schema?.columns ?? [];
  const sample = pod.sample_data ?? [];
  $("#datapod-rows").textContent = pod.schema
    ? `${pod.schema.row_count ?? "?"} rows, ${pod.schema.column_count ?? columns.length} columns (${pod.schema.format ?? pod.file_type ?? "?"})`
    : "No schema was inferred for this dataset.";
  $("#datapod-schema tbody").replaceChildren(...columns.map((column) => element("tr", {},
    element("th", { scope: "row" }, column.name), element("td", {}, column.type), element("td", {}, String(column.null_count ?? 0)))));
  const names = columns.length ? columns.map((column) => column.name) : [...new Set(sample.flatMap(Object.keys))];
  $("#datapod-sample thead").replaceChildren(element("tr", {}, ...names.map((name) => element("th", { scope: "col" }, name))));
  $("#datapod-sample tbody").replaceChildren(...(sample.length
    ? sample.map((row) => element("tr", {}, ...names.map((name) => element("td", {}, cellText(row[name])))))
    : [element("tr", {}, element("td", { colspan: String(Math.max(1, names.length)) }, "No sample rows."))]));
}

function reviewItem(review) {
  const stars = "★".repeat(review.rating) + "☆".repeat(5 - review.rating);
  return element("li", { dataset: { rating: String(review.rating) } },
    element("span", { class: "stars", role: "img", "aria-label": `${review.rating} out of 5` }, stars), " ",
    element("strong", {}, review.buyer?.username ?? "a buyer"), " ",
    element("time", { datetime: review.created_at }, new Date(review.created_at).toLocaleDateString()),
    review.comment ? element("p", { class: "comment" }, review.comment) : null);
}

async function fetchReviews(id, cursor) {
  const params = new URLSearchParams({ limit: String(REVIEW_PAGE) });
  if (cursor) params.set("cursor", cursor);
  return api("GET", `/api/v1/datapods/${id}/reviews?${params}`);
}

/** Append a page of older reviews; a review already shown (it came live) is not shown twice. */
function appendReviews(page) {
  const list = $("#reviews");
  for (const review of page.items) {
    if (!list.querySelector(`[data-key="${CSS.escape(review.id)}"]`)) {
      const item = reviewItem(review);
      item.dataset.key = review.id;
      list.append(item);
    }
  }
  detail.nextCursor = page.next_cursor;
  $("#reviews-more").hidden = !page.next_cursor;
}

/** Put the reviews posted since the page loaded on top, newest first (the live event has no text). */
async function showNewReviews(id) {
  const page = await fetchReviews(id);
  if (detail.id !== id) return;
  const list = $("#reviews");
  for (const review of [...page.items].reverse()) {
    if (!list.querySelector(`[data-key="${CSS.escape(review.id)}"]`)) upsert(list, review.id, reviewItem(review));
  }
}

/** The caller's purchases of one DataPod (all pages: a buyer has few). */
async function ownPurchasesOf(id) {
  const found = [];
  let cursor = null;
  do {
    const params = new URLSearchParams({ limit: "100", datapod_id: id });
    if (cursor) params.set("cursor", cursor);
    const page = await api("GET", `/api/v1/purchases?${params}`);
    found.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return found;
}

/** Offer the review form to a buyer with a completed purchase not yet reviewed; the server decides. */
async function showReviewForm(id) {
  const mine = await ownPurchasesOf(id);
  if (detail.id !== id) return;
  const open = mine.find((purchase) => purchase.status === "completed" && !purchase.reviewed);
  detail.purchase = open ?? null;
  $("#review-form").hidden = !open;
  $("#review-status").textContent = open ? ""
    : mine.some((purchase) => purchase.status === "completed") ? "You reviewed this DataPod."
    : mine.length ? "You can review this DataPod once your purchase completes." : "";
}

function applyDatapodEvent(event) {
  const data = event.data;
  if (event.type === "datapod_updated") showPod({ ...detail.pod, ...data.changes, updated_at: data.updated_at });
  else if (event.type === "datapod_sold") showPod({ ...detail.pod, purchase_count: data.purchase_count });
  else if (event.type === "review_added") {
    showPod({ ...detail.pod, average_rating: data.average_rating, review_count: data.review_count });
    const id = detail.id;
    showNewReviews(id).catch((error) => { $("#reviews-error").textContent = `Could not load the new review: ${error.message}`; });
  } else if (event.type === "datapod_unpublished") {
    $("#datapod-notice").textContent = "The seller withdrew this DataPod from the marketplace.";
  } else if (event.type === "datapod_published") {
    $("#datapod-notice").textContent = "";
    showPod({ ...detail.pod, ...data });
  }
}

/** "More like this": published DataPods scored by the server (category, tags, columns, words). */
async function showSimilar(id) {
  const { items } = await api("GET", `/api/v1/datapods/${id}/similar?limit=6`);
  if (detail.id !== id) return;
  $("#similar").replaceChildren(...(items.length
    ? items.map((pod) => element("li", { dataset: { key: pod.id } },
      element("a", { href: datapodHref(pod.id) }, pod.title ?? pod.id), ` · ${pod.category ?? ""} · ${formatAmount(pod.price_sui)} SUI`))
    : [element("li", {}, "Nothing similar yet.")]));
}

async function loadDatapod(id) {
  const [pod, reviews] = await Promise.all([api("GET", `/api/v1/datapods/${id}`), fetchReviews(id)]);
  pod.row_count ??= pod.schema?.row_count;
  if (detail.id !== id) return;
  showPod(pod);
  showDataset(pod);
  $("#datapod-buy").replaceChildren(...buyControls(pod));
  $("#reviews").replaceChildren();
  appendReviews(reviews);
  showSimilar(id).catch(() => {});  // a suggestion list: the page is whole without it
  // Events that came while the pod loaded: their values are absolute, so applying them again is harmless.
  for (const event of detail.pending.splice(0)) applyDatapodEvent(event);
}

function clearDatapodView() {
  for (const id of ["datapod-error", "datapod-viewers", "datapod-notice", "datapod-description", "datapod-category",
    "datapod-price", "datapod-seller", "datapod-rating", "datapod-sold", "datapod-rows", "review-status", "review-error",
    "reviews-error"]) $(`#${id}`).textContent = "";
  $("#datapod-title").textContent = "Loading…";
  for (const selector of ["#datapod-buy", "#datapod-schema tbody", "#datapod-sample thead", "#datapod-sample tbody", "#reviews",
    "#similar"]) {
    $(selector).replaceChildren();
  }
  $("#reviews-more").hidden = true;
  $("#review-form").hidden = true;
}

async function openDatapod(id) {
  if (detail.id === id) return;
  closeDatapod();
  Object.assign(detail, { id, pod: null, pending: [], nextCursor: null, purchase: null });
  clearDatapodView();
  showTab("marketplace");
  $("#market-list").hidden = true;
  $("#datapod-view").hidden = false;
  $("#datapod-back").focus();
  if (!me) { // signed out: no socket (the page opens none for anonymous visitors), no purchases
    await loadDatapod(id).catch((error) => {
      if (detail.id !== id) return;
      $("#datapod-title").textContent = "DataPod";
      $("#datapod-error").textContent = `Could not load this DataPod: ${error.message}`;
    });
    return;
  }
  // Subscribed before the pod is read, so nothing that changes it meanwhile is missed.
  const subscription = hub.subscribe("/marketplace", `datapod:${id}`, {
    onPresence(count) { if (detail.id === id) $("#datapod-viewers").textContent = `${count} viewing`; },
    onGap() { if (detail.id === id) loadDatapod(id).catch(() => {}); },
    onEvent(event) {
      if (detail.id !== id) return;
      if (detail.pod) applyDatapodEvent(event);
      else detail.pending.push(event);
    },
  });
  await Promise.all([
    subscription.catch((error) => {
      if (detail.id === id) $("#datapod-notice").textContent = `Live updates are unavailable: ${error.message}`;
    }),
    loadDatapod(id).catch((error) => {
      if (detail.id !== id) return;
      $("#datapod-title").textContent = "DataPod";
      $("#datapod-error").textContent = `Could not load this DataPod: ${error.message}`;
    }),
    showReviewForm(id).catch((error) => {
      if (detail.id === id) $("#review-error").textContent = `Could not check your purchases: ${error.message}`;
    }),
  ]);
}

function closeDatapod() {
  const { id } = detail;
  if (!id) return;
  Object.assign(detail, { id: null, pod: null, pending: [], purchase: null });
  $("#datapod-view").hidden = true;
  $("#market-list").hidden = false;
  // Leaving stops this page counting as a viewer, for everyone else on the page. Not awaited: a
  // socket sends its commands in order, so a page reopened at once subscribes after this leaves.
  if (me) hub.unsubscribe("/marketplace", `datapod:${id}`).catch(() => {});
}

/** Show what the address names: a DataPod page (#/datapods/<id>), a view (#/<view>), else the marketplace. */
async function route() {
  const match = DATAPOD_ROUTE.exec(location.hash);
  if (match) {
    await openDatapod(match[1].toLowerCase());
    return;
  }
  closeDatapod();
  const [, view, path = ""] = /^#\/([a-z]+)(?:\/(.*))?$/.exec(location.hash) ?? [];
  const known = VIEWS.includes(view);
  // Signed out, a private view's link shows the marketplace and the sign-in form says why;
  // signing in then opens the view the link named.
  const notice = $("#sign-in-notice");
  notice.textContent = [notice.dataset.reason, !me && known && view !== "marketplace" ? `Sign in to open ${VIEW_NAMES[view]}.` : ""]
    .filter(Boolean).join(" ");
  const shown = known && (me || view === "marketplace") ? view : "marketplace";
  showTab(shown);
  if (me && VIEW_MODULES[shown]?.route) await VIEW_MODULES[shown].route(decodeURIComponent(path));
}

window.addEventListener("hashchange", () => { if (!starting) route(); });
$("#datapod-back").addEventListener("click", () => { location.hash = "#/marketplace"; });
$("#reviews-more").addEventListener("click", async () => {
  const id = detail.id;
  const button = $("#reviews-more");
  button.disabled = true;
  $("#reviews-error").textContent = "";
  try {
    const page = await fetchReviews(id, detail.nextCursor);
    if (detail.id === id) appendReviews(page);
  } catch (error) {
    $("#reviews-error").textContent = `Could not load more reviews: ${error.message}`;
  } finally {
    button.disabled = false;
  }
});
$("#review-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const { id, purchase } = detail;
  if (!purchase) return;
  const button = form.querySelector("button[type=submit]");
  const comment = form.comment.value.trim();
  button.disabled = true;
  $("#review-error").textContent = "";
  try {
    await api("POST", `/api/v1/purchases/${purchase.id}/review`, { rating: Number(form.rating.value), ...(comment ? { comment } : {}) });
    if (detail.id !== id) return;
    form.reset();
    form.hidden = true;
    detail.purchase = null;
    $("#review-status").textContent = "Thank you: your review is posted.";
    await showNewReviews(id);
  } catch (error) {
    $("#review-error").textContent = `Your review was not posted: ${error.message}`;
  } finally {
    button.disabled = false;
  }
});

// --- wallet -------------------------------------------------------------------------------
// The wallet key is an Ed25519 key made by WebCrypto and kept in this browser's IndexedDB (one per
// account); the hub only ever sees the public key and signatures. It travels as a backup file
// encrypted under a passphrase (wallet-backup.js), opened in the other browser. The demo users'
// keys are public like their password: static/demo-wallets/<username>.json, passphrase DEMO_PASSPHRASE.

const wallet = { address: null, key: null, demo: null };
const hex = (bytes) => [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");
const DEMO_USERS = ["alice", "bob", "carol"];
const DEMO_PASSPHRASE = "demo-password";

function keyStore(mode, action) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("hub-wallets", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const request = action(open.result.transaction("keys", mode).objectStore("keys"));
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    };
  });
}

/** The demo user's backup file when the signed-in account is a demo user whose registered wallet it is. */
async function demoBackup() {
  if (!DEMO_USERS.includes(me.username) || !wallet.address) return null;
  const response = await fetch(`/demo-wallets/${me.username}.json`).catch(() => null);
  if (!response?.ok) return null;
  const backup = parseBackup(await response.text());
  return backup.address === wallet.address ? backup : null;
}

async function showWallet() {
  const usable = Boolean(wallet.address && wallet.key);
  $("#wallet-address").textContent = wallet.address ?? "none yet";
  $("#wallet-create").hidden = Boolean(wallet.address);
  $("#wallet-backup").hidden = !usable;
  $("#wallet-demo").hidden = usable || !wallet.demo;
  $("#wallet").dataset.keyHere = String(usable);
  $("#wallet-key-state").textContent = !wallet.address ? "No wallet yet: create one here, or restore one from a backup file."
    : usable ? "This browser holds your wallet key: it can pay."
    : wallet.demo ? "This demo account's wallet key is not in this browser yet: use the demo wallet, or restore a backup file."
    : "Your wallet key is not in this browser: restore it from your backup file to pay from here.";
  if (!wallet.address) return;
  const summary = await api("GET", `/api/v1/wallets/${wallet.address}`);
  $("#wallet-balance").textContent = summary.available;
}

async function loadWallet() {
  const stored = (await keyStore("readonly", (store) => store.get(me.id))) ?? null;
  wallet.address = (await api("GET", "/api/v1/me/wallet")).address;
  // A key kept for another wallet than the account's (an older one, a mix-up) cannot pay for it.
  wallet.key = stored && (!wallet.address || (await addressOf(stored.publicKey)) === wallet.address) ? stored : null;
  wallet.demo = wallet.key ? null : await demoBackup().catch(() => null);
  await showWallet();
}

/** The signed-in user's wallet, made and registered on first use; throws when its key is elsewhere. */
async function ensureWallet() {
  if (wallet.address && wallet.key) return wallet;
  if (wallet.address && !wallet.key) {
    throw new Error(wallet.demo
      ? "This demo account's wallet key is not in this browser yet: choose \"Use the demo wallet\" in the Purchases tab."
      : "Your wallet key is not in this browser: restore it from your backup file in the Purchases tab to pay from here.");
  }
  // Kept before it is registered: a key the hub knows must never be lost by this page.
  if (!wallet.key) {
    wallet.key = await generateWalletKey();
    await keyStore("readwrite", (store) => store.put(wallet.key, me.id));
  }
  wallet.address = (await api("PUT", "/api/v1/me/wallet", { public_key: wallet.key.publicKey })).address;
  await showWallet();
  return wallet;
}

/**
 * Take a key from a backup: it must be this account's registered wallet (or, for an account with
 * none yet, it becomes it). Kept in this browser only once it is known to fit.
 */
async function restoreWallet(backup, passphrase) {
  const current = (await api("GET", "/api/v1/me/wallet")).address;
  if (current && backup.address !== current) {
    throw new BackupError(`This backup is for the wallet ${backup.address}, not for this account's wallet ${current}.`);
  }
  const key = await openBackup(backup, passphrase);
  if (current && key.address !== current) throw new BackupError("This backup's key is not this account's wallet key.");
  const stored = { privateKey: key.privateKey, publicKey: key.publicKey };
  await keyStore("readwrite", (store) => store.put(stored, me.id));
  wallet.key = stored;
  wallet.demo = null;
  if (!current) wallet.address = (await api("PUT", "/api/v1/me/wallet", { public_key: key.publicKey })).address;
  else wallet.address = current;
  await showWallet();
}

function saveFile(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const anchor = element("a", { href: url, download: name });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A decimal amount in KVP base units (1e-8), exactly (money never goes through floats); digits past the 8th dropped. */
function kvpUnits(amount) {
  const [whole, fraction = ""] = String(amount).split(".");
  return BigInt(whole) * 100000000n + BigInt(fraction.padEnd(8, "0").slice(0, 8));
}

/** A KVP amount (8 decimals) covering a SUI price (9 decimals): rounded up, never below the price. */
function kvpAmount(price) {
  const fraction = String(price).split(".")[1] ?? "";
  const units = kvpUnits(price) + (/[1-9]/.test(fraction.slice(8)) ? 1n : 0n);
  return `${units / 100000000n}.${String(units % 100000000n).padStart(8, "0")}`;
}

/** Sign a transfer over its canonical bytes (docs/protocol.md) and submit it; the pending transaction. */
async function transfer(receiver, amount) {
  const { next_nonce: nonce } = await api("GET", `/api/v1/wallets/${wallet.address}`);
  const message = ["KVP-TX-V1", wallet.address, receiver, amount, String(nonce)].join("\n");
  const signature = hex(await crypto.subtle.sign("Ed25519", wallet.key.privateKey, new TextEncoder().encode(message)));
  return api("POST", "/api/v1/transactions", { sender: wallet.address, receiver, amount, nonce, signature });
}

/** Sign text with this browser's wallet key (Ed25519): the signature in hex. */
async function signText(text) {
  await ensureWallet();
  return hex(await crypto.subtle.sign("Ed25519", wallet.key.privateKey, new TextEncoder().encode(text)));
}

// What the views may do with the wallet; the key itself never leaves this module.
const walletApi = {
  address: () => wallet.address,
  ensure: ensureWallet,
  sign: signText,
  transfer: async (receiver, amount) => { await ensureWallet(); return transfer(receiver, amount); },
  refresh: () => showWallet(),
};

async function walletAction(action, busy) {
  $("#wallet-error").textContent = "";
  $("#wallet-message").textContent = "";
  if (busy) busy.disabled = true;
  try {
    await action();
  } catch (error) {
    $("#wallet-error").textContent = error.message;
  } finally {
    if (busy) busy.disabled = false;
  }
}

$("#wallet-export-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  walletAction(async () => {
    if (form.passphrase.value !== form.repeat.value) throw new Error("The two passphrases differ.");
    if (!wallet.key) throw new Error("This browser does not hold the wallet key: there is nothing to back up here.");
    saveFile(`sourcenet-wallet-${wallet.address}.json`, await createBackup(wallet.key, form.passphrase.value));
    form.reset();
    $("#wallet-message").textContent = "Backup file saved. Keep it and its passphrase apart and safe: " +
      "whoever has both can spend from this wallet, and without them the key cannot be recovered.";
  }, form.querySelector("button"));
});
$("#wallet-import-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  walletAction(async () => {
    const [file] = form.file.files;
    if (!file) throw new Error("Choose the backup file first.");
    await restoreWallet(parseBackup(await file.text()), form.passphrase.value);
    form.reset();
    $("#wallet-message").textContent = "Wallet restored: this browser can pay from it now.";
  }, form.querySelector("button"));
});
$("#wallet-demo").addEventListener("click", (event) => walletAction(async () => {
  if (!wallet.demo) throw new Error("This account has no demo wallet.");
  await restoreWallet(wallet.demo, DEMO_PASSPHRASE);
  $("#wallet-message").textContent = "Demo wallet ready: this browser can pay from it now.";
}, event.currentTarget));

$("#wallet-create").addEventListener("click", () => walletAction(async () => {
  await ensureWallet();
  $("#wallet-message").textContent = "Wallet ready.";
}));
$("#wallet-faucet").addEventListener("click", () => walletAction(async () => {
  await ensureWallet();
  const paid = await api("POST", "/api/v1/me/faucet");
  await showWallet();
  $("#wallet-message").textContent = `Received ${paid.credited} demo KVP.`;
}));

// --- purchases ----------------------------------------------------------------------------

const STEP_LABELS = {
  payment_pending: "waiting for payment", payment_verifying: "verifying payment", payment_verified: "payment verified",
  key_wrapping: "preparing the key", escrow_holding: "payment held in escrow", completed: "completed",
  failed: "failed", refunded: "refunded",
};
const purchases = new Map(); // purchase id -> what is known of it, with the steps seen so far
let escrowTerms = null; // GET /api/v1/escrow: where payments go, the escrow window, the block interval

/** Ask before spending: what is paid, in which currency, and where the money waits until delivery. */
function confirmPurchase(pod, amount, escrow) {
  const dialog = $("#buy-dialog");
  const days = Math.round(escrow.release_seconds / 86400);
  $("#buy-dialog-text").textContent = `Pay ${amount} KVP for "${pod.title}" (priced ${pod.price_sui} SUI). ` +
    `The payment waits in escrow until you confirm receipt, or for ${days > 0 ? `${days} days` : "a short while"}; ` +
    "until then you can open a dispute from the Purchases tab.";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "pay"), { once: true });
  });
}

/** Pay the escrow on the KVP chain from this browser's wallet, then start the purchase with the digest. */
async function buyDatapod(pod) {
  if (ownPurchaseOf(pod.id)) throw new Error("You already bought this DataPod (see the Purchases tab).");
  await ensureWallet();
  // The payment waits in the server's escrow wallet until the buyer confirms or the window passes.
  const escrow = escrowTerms = await api("GET", "/api/v1/escrow");
  const amount = kvpAmount(pod.price_sui);
  const { available } = await api("GET", `/api/v1/wallets/${wallet.address}`);
  if (kvpUnits(available) < kvpUnits(amount)) {
    throw new Error(`Insufficient funds to pay ${amount} KVP (${available} KVP available). Get demo funds in the Purchases tab.`);
  }
  if (!(await confirmPurchase(pod, amount, escrow))) return;
  let tx;
  try {
    tx = await transfer(escrow.address, amount);
  } catch (error) {
    if (error.code === "conflict" && error.field === "amount") {
      throw new Error(`Insufficient funds to pay ${amount} KVP (${error.message}). Get demo funds in the Purchases tab.`);
    }
    throw error;
  }
  showWallet().catch(() => {});
  const purchase = await api("POST", "/api/v1/purchases", { datapod_id: pod.id, payment_tx_digest: tx.hash })
    .catch((error) => { throw new Error(`Paid (transaction ${tx.hash}) but the purchase did not start: ${error.message}`); });
  showPurchase({ ...purchase, datapod_title: pod.title, step: "payment_pending", percent: 0 });
  openTab("purchases");
}

function showPurchase(update) {
  const id = update.purchase_id ?? update.id;
  const known = purchases.get(id) ?? { id, steps: [] };
  const merged = { ...known, ...Object.fromEntries(Object.entries(update).filter(([, v]) => v !== undefined && v !== null)) };
  merged.steps = known.steps;
  if (update.step && STEP_LABELS[update.step] && !merged.steps.includes(update.step)) merged.steps.push(update.step);
  purchases.set(id, merged);
  upsert($("#purchases"), id, purchaseRow(merged));
  if (known.status !== merged.status) refreshBuyControls();
}

function purchaseRow(purchase) {
  const done = ["completed", "failed", "refunded"].includes(purchase.status);
  const percent = purchase.percent ?? (done ? 100 : 0);
  const label = `${purchase.datapod_title ?? "DataPod"} purchase progress`;
  const row = element("li", { dataset: { purchaseId: purchase.id, status: purchase.status, steps: purchase.steps.join(" ") } },
    element("strong", {}, purchase.datapod_title ?? purchase.datapod_id ?? "purchase"), " ",
    element("span", { class: "status" }, STEP_LABELS[purchase.step] ?? purchase.status ?? ""), " ",
    element("progress", { max: "100", value: String(percent), "aria-label": label }),
    element("span", { class: "percent" }, ` ${percent}%`));
  if (!done && ["payment_pending", "payment_verifying", undefined].includes(purchase.step)) {
    // Until its block is sealed the payment is not on the chain: the bar waits for the next block.
    const interval = escrowTerms?.block_seconds;
    row.append(element("p", { class: "hint wait" }, "Waiting for your payment to be sealed in a block" +
      (interval ? ` (the chain seals one every ${formatAmount(interval)} s)` : "") + ": then the dataset key is prepared for you."));
  }
  if (purchase.payment_tx_digest) {
    const hash = purchase.payment_tx_digest;
    row.append(element("p", { class: "meta" }, "Payment ",
      element("a", { href: `#/chain/tx/${encodeURIComponent(hash)}`, title: hash }, `${hash.slice(0, 12)}…`)));
  }
  if (purchase.reason) row.append(" ", element("span", { class: "error" }, purchase.reason));
  if (purchase.status === "completed") {
    const error = element("span", { class: "error", role: "alert" });
    const button = element("button", { type: "button", class: "download" }, "Download");
    button.addEventListener("click", () => download(purchase.id).catch((failure) => { error.textContent = failure.message; }));
    row.append(" ", button, " ", error);
  }
  if (purchase.escrow_status) row.append(escrowPanel(purchase));
  return row;
}

const ESCROW_LABELS = {
  holding: "Payment held in escrow: confirm receipt to pay the seller, or dispute it.",
  disputed: "Disputed: an administrator will release or refund the payment.",
  released: "Released to the seller.", refunded: "Refunded to you.",
};

/** The purchase's escrow: where the money is, and the buyer's two actions while it is held. */
function escrowPanel(purchase) {
  const settled = purchase.escrow_settled ? " Paid out on the chain." : "";
  const panel = element("div", { class: "escrow", dataset: { escrowStatus: purchase.escrow_status } },
    element("span", {}, (ESCROW_LABELS[purchase.escrow_status] ?? purchase.escrow_status) + settled));
  if (purchase.escrow_status !== "holding" || purchase.status !== "completed") return panel;
  const error = element("span", { class: "error", role: "alert" });
  const act = (action) => action().then(refreshPurchase.bind(null, purchase.id), (failure) => { error.textContent = failure.message; });
  const confirm = element("button", { type: "button" }, "Confirm receipt");
  confirm.addEventListener("click", () => act(() => api("POST", `/api/v1/purchases/${purchase.id}/confirm`)));
  const reason = element("input", { name: "reason", required: "", maxlength: "1000", "aria-label": "What is wrong with it?" });
  const dispute = element("form", { class: "dispute" }, reason, " ", element("button", { type: "submit" }, "Dispute"));
  dispute.addEventListener("submit", (event) => {
    event.preventDefault();
    act(() => api("POST", `/api/v1/purchases/${purchase.id}/dispute`, { reason: reason.value }));
  });
  panel.append(" ", confirm, " ", dispute, " ", error);
  return panel;
}

/** Re-read one purchase (its escrow moved) and redraw its row. */
async function refreshPurchase(purchaseId) {
  showPurchase(await api("GET", `/api/v1/purchases/${purchaseId}`));
}

/**
 * The decrypted dataset through a signed link (the server checks the GCM tag and the data hash before
 * sending it). The browser fetches the link itself, so the file streams to disk instead of into
 * memory, and an interrupted download can be resumed (the link serves byte ranges until it expires).
 */
async function download(purchaseId) {
  const link = await api("POST", `/api/v1/purchases/${purchaseId}/download-link`);
  // The server's Content-Disposition names the file; `download` keeps the page where it is.
  const anchor = element("a", { href: link.url, download: "", rel: "noreferrer" });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
}

async function watchPurchases() {
  const load = async () => {
    const data = await api("GET", "/api/v1/purchases").catch(() => ({ items: [] }));
    $("#purchases").replaceChildren();
    for (const purchase of [...(data.items ?? [])].reverse()) {
      showPurchase({ ...purchase, step: purchase.status === "completed" ? "completed" : undefined });
    }
  };
  escrowTerms = await api("GET", "/api/v1/escrow").catch(() => null);
  await Promise.all([load(), loadWallet().catch((error) => { $("#wallet-error").textContent = error.message; })]);
  await hub.subscribe("/purchases", `user:${me.id}`, {
    onGap: load,
    onEvent(event) {
      // Escrow events also reach a seller about their sales: only the buyer's own rows are redrawn.
      if (event.type.startsWith("escrow_") && purchases.has(event.data.purchase_id)) {
        refreshPurchase(event.data.purchase_id).catch(() => {});
        return;
      }
      if (event.type !== "purchase_progressed") return;
      showPurchase(event.data);
      // Progress events carry the steps; the finished purchase's escrow comes from its own read.
      if (["completed", "refunded"].includes(event.data.status)) refreshPurchase(event.data.purchase_id).catch(() => {});
      if (event.data.status === "completed" && event.data.datapod_id === detail.id) showReviewForm(detail.id).catch(() => {});
    },
  });
}


// --- start --------------------------------------------------------------------------------

let starting = false; // a refresh during start's own /me call must not start it twice

async function start() {
  starting = true;
  try {
    me = session.token ? await api("GET", "/api/v1/me") : null;
  } catch {
    session.clear();
    me = null;
  } finally {
    starting = false;
  }
  const signedOut = sessionStorage.getItem(SIGNED_OUT_KEY);
  sessionStorage.removeItem(SIGNED_OUT_KEY);
  const notice = $("#sign-in-notice");
  notice.dataset.reason = !me && signedOut ? SIGNED_OUT_TEXT[signedOut] ?? SIGNED_OUT_TEXT.revoked : "";
  notice.textContent = notice.dataset.reason;
  $("#sign-in").hidden = Boolean(me);
  $("#sign-out").hidden = !me;
  document.body.dataset.signedIn = String(Boolean(me));
  $("#dashboard").hidden = false;
  for (const tab of document.querySelectorAll("nav [data-private]")) tab.hidden = !me;
  if (!me) {
    // Anyone may browse: the marketplace over REST, with no socket until someone signs in.
    showConnectionState("signed out");
    await Promise.all([route(), loadDatapods(), ...Object.values(VIEW_MODULES).map((view) => view.signedOut?.({ api }))]);
    return;
  }
  $("#whoami").textContent = me.username;
  detail.id = null; // a DataPod page opened signed out: opened again, now live and with its Buy button
  hub.reauthenticate();
  const context = { hub, api, me, datapodCard, openTab, wallet: walletApi };
  await Promise.all([route(), watchMarket(), watchPurchases(), ...Object.values(VIEW_MODULES).map((view) => view.start(context))]);
}

start();
