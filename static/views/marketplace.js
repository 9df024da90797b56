// The Marketplace view (#/marketplace, #/datapods/<id>): live DataPods with search and filters, and
// each DataPod's page with its dataset, reviews and similar pods. Open to visitors, over REST.
import { api } from "../hub.js";
import { $, datapodHref, element, formatAmount, formatDate, formatSize, listed, upsert } from "../ui.js";
import { buyDatapod, download, ownPurchaseOf } from "./purchases.js";

let hub = null;
let me = null; // null for a visitor

function cardRating(pod) {
  const rating = Number(pod.average_rating ?? 0);
  return rating > 0 ? `★ ${rating.toFixed(1)}` : "No ratings yet";
}

/** A DataPod as a marketplace card (also the assistant's cards): its facts and what the user can do with it. */
export function datapodCard(pod) {
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
export function refreshBuyControls() {
  for (const box of document.querySelectorAll(".buy-area")) if (box.pod) fillBuyControls(box);
}

const MARKET_PAGE = 20;
const market = { cursor: null, total: null, estimated: false, request: 0 };

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
  // Over a large market the facets count a sample (`estimated`): say so rather than print a false exact number.
  const count = market.estimated ? `About ${total.toLocaleString("en-US")}` : total.toLocaleString("en-US");
  $("#market-count").textContent = total === 0 ? "No DataPods found."
    : `${count} DataPod${total === 1 ? "" : "s"}${shown < total ? ` · showing ${shown}` : ""}`;
  $("#market-empty").hidden = shown > 0;
  $("#market-more").hidden = !market.cursor;
}

function marketCard(pod) {
  const card = datapodCard(pod);
  card.dataset.key = pod.id;
  card.pod = pod; // live updates (a sale, an edit) merge into what the list showed
  return card;
}

/** The card the list already shows for `pod` when nothing on it changed, with its Buy box redrawn for who is signed in. */
function shownCard(list, pod) {
  const card = listed(list, pod.id);
  if (!card?.pod || JSON.stringify(card.pod) !== JSON.stringify(pod)) return null;
  for (const box of card.querySelectorAll(".buy-area")) fillBuyControls(box);
  return card;
}

/**
 * Make the list hold exactly `cards`, in order, moving only what moved. Signing in reloads the list
 * (subscribed first, so nothing published meanwhile is missed): replacing every card then could
 * swallow a click on one between the press and the release.
 */
function reconcileCards(list, cards) {
  cards.forEach((card, index) => {
    if (list.children[index] !== card) list.insertBefore(card, list.children[index] ?? null);
  });
  while (list.children.length > cards.length) list.lastElementChild.remove();
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
    if (more) {
      list.append(...(page.items ?? []).filter((pod) => !listed(list, pod.id)).map(marketCard));
    } else reconcileCards(list, (page.items ?? []).map((pod) => shownCard(list, pod) ?? marketCard(pod)));
    market.cursor = page.next_cursor ?? null;
    if (counted) {
      market.total = counted.total;
      market.estimated = Boolean(counted.estimated);
    }
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
  const existing = listed($("#datapods"), id);
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

export const DATAPOD_ROUTE = /^#(?:\/datapods\/|datapod\/)([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$/i;
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
    if (!listed(list, review.id)) {
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
    if (!listed(list, review.id)) upsert(list, review.id, reviewItem(review));
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

/** Open the DataPod page of `id` (the address #/datapods/<id>); live while it is open, signed in. */
export async function openDatapod(id) {
  if (detail.id === id) return;
  closeDatapod();
  Object.assign(detail, { id, pod: null, pending: [], nextCursor: null, purchase: null });
  clearDatapodView();
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

/** Leave the DataPod page, if one is open, for the list. */
export function closeDatapod() {
  const { id } = detail;
  if (!id) return;
  Object.assign(detail, { id: null, pod: null, pending: [], purchase: null });
  $("#datapod-view").hidden = true;
  $("#market-list").hidden = false;
  // Leaving stops this page counting as a viewer, for everyone else on the page. Not awaited: a
  // socket sends its commands in order, so a page reopened at once subscribes after this leaves.
  if (me) hub.unsubscribe("/marketplace", `datapod:${id}`).catch(() => {});
}

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

/** Follow the marketplace live, signed in; a DataPod page opened signed out opens again, live and with Buy. */
export async function start(context) {
  ({ hub, me } = context);
  detail.id = null;
  await watchMarket();
}

/** A visitor browses the list over REST, with no socket. */
export async function signedOut() {
  await loadDatapods();
}

/** The list again, when it failed while the hub was unreachable. */
export function retry() {
  if ($("#market-error").textContent) loadDatapods().catch(() => {});
}

/** A purchase of `datapodId` completed: its open page offers the review form. */
export function purchaseCompleted(datapodId) {
  if (datapodId === detail.id) showReviewForm(detail.id).catch(() => {});
}
