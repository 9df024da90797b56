// The NFTs view: my NFTs (mint, list for sale, cancel a listing), the open listings of others with
// Buy (#/nfts), and one NFT's page (#/nfts/<id>). Everything is REST; the `market:nfts` channel of
// /marketplace keeps the page current: a listing bought or cancelled elsewhere goes at once.
// Docs: docs/protocol.md, "/marketplace: NFTs". Prices are KVP decimal strings (never floats).
import { html, render, useEffect, useRef } from "../vendor/preact-htm.module.js";
import { formatAmount, formatDate } from "../ui.js";

const PAGE = 20;
const PRICE = /^\d{1,10}(\.\d{1,8})?$/;
const UNIT = 100000000n; // KVP has 8 decimals

let context = null;
let root = null;
let markReady;
const ready = new Promise((resolve) => { markReady = resolve; });

const state = {
  view: "list", // "list" or "nft"
  address: undefined, // this account's wallet: undefined until known, null without one
  available: null, // this account's spendable KVP, a string
  mine: new Map(), // nft id -> <NFT> with .listing (its available <Listing> or null)
  mineOrder: [],
  mineNext: null,
  sale: new Map(), // listing id -> <Listing>, others' available listings
  saleOrder: [],
  saleNext: null,
  loaded: false,
  error: "", // loading the lists
  notice: "", // what just happened (a sale, a purchase), in a status region
  busy: new Set(), // keys of the actions under way ("list:7", "cancel:12", "buy:12")
  cardErrors: new Map(), // nft id or "l<listing id>" -> error text
  mint: { errors: {}, error: "", busy: false, attributes: [0], nextAttribute: 1 },
  games: [],
  detail: { id: null, nft: null, error: "", loading: false },
  buying: null, // the listing whose confirmation dialog is open
  buyError: "",
  loadingMore: "",
};
const closedListings = new Set(); // listing ids seen sold or cancelled: an older "listed" never revives them
let pending = []; // events that came before the first lists

// --- helpers ----------------------------------------------------------------------------------

const shortAddress = (address) => (address && address.length > 16 ? `${address.slice(0, 10)}…${address.slice(-4)}` : address ?? "");
const ownerName = (address) => (address && address === state.address ? "you" : shortAddress(address));
const nftName = (nft) => nft?.metadata?.name ?? `NFT #${nft?.id}`;

/** A KVP decimal string in base units (BigInt): money is never a float here. */
function units(amount) {
  const [whole, fraction = ""] = String(amount).split(".");
  return BigInt(whole || "0") * UNIT + BigInt((fraction.padEnd(8, "0")).slice(0, 8) || "0");
}

function draw() {
  if (root && context) render(html`<${NftsView} />`, root);
}

function setBusy(key, on) {
  if (on) state.busy.add(key);
  else state.busy.delete(key);
  draw();
}

async function loadAddress() {
  state.address = (await context.api("GET", "/api/v1/me/wallet")).address ?? null;
  return state.address;
}

async function loadBalance() {
  if (!state.address) return;
  state.available = (await context.api("GET", `/api/v1/wallets/${state.address}`)).available;
  draw();
}

/** This account's wallet, registered on first need (minting and buying need one; neither needs its key here). */
async function ensureAddress() {
  if (state.address === undefined) await loadAddress();
  if (state.address) return state.address;
  await context.wallet.ensure();
  state.address = context.wallet.address();
  await Promise.all([loadLists(), loadBalance()]);
  return state.address;
}

// --- the lists --------------------------------------------------------------------------------

function putMine(nft, { prepend = true } = {}) {
  const known = state.mine.get(nft.id);
  state.mine.set(nft.id, { ...known, ...nft, listing: nft.listing !== undefined ? nft.listing : known?.listing ?? null });
  if (!state.mineOrder.includes(nft.id)) state.mineOrder = prepend ? [nft.id, ...state.mineOrder] : [...state.mineOrder, nft.id];
}

function dropMine(nftId) {
  state.mine.delete(nftId);
  state.mineOrder = state.mineOrder.filter((id) => id !== nftId);
}

function putSale(listing, { prepend = true } = {}) {
  if (closedListings.has(listing.id) || listing.status !== "Available" || listing.seller_wallet === state.address) return;
  state.sale.set(listing.id, listing);
  if (!state.saleOrder.includes(listing.id)) state.saleOrder = prepend ? [listing.id, ...state.saleOrder] : [...state.saleOrder, listing.id];
}

function dropSale(listingId) {
  state.sale.delete(listingId);
  state.saleOrder = state.saleOrder.filter((id) => id !== listingId);
}

async function loadMine({ more = false } = {}) {
  if (!state.address) {
    Object.assign(state, { mine: new Map(), mineOrder: [], mineNext: null });
    return;
  }
  const params = new URLSearchParams({ owner: state.address, limit: String(PAGE) });
  if (more && state.mineNext) params.set("before_id", String(state.mineNext));
  const [page, listings] = await Promise.all([
    context.api("GET", `/api/v1/nfts?${params}`),
    context.api("GET", `/api/v1/nft-listings?seller=${state.address}&limit=100`),
  ]);
  const listingOf = new Map(listings.listings.map((listing) => [listing.nft_id, listing]));
  if (!more) Object.assign(state, { mine: new Map(), mineOrder: [] });
  for (const nft of page.nfts) putMine({ ...nft, listing: listingOf.get(nft.id) ?? null }, { prepend: false });
  state.mineNext = page.next_before_id ?? null;
}

async function loadSale({ more = false } = {}) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (more && state.saleNext) params.set("before_id", String(state.saleNext));
  const page = await context.api("GET", `/api/v1/nft-listings?${params}`);
  if (!more) Object.assign(state, { sale: new Map(), saleOrder: [] });
  for (const listing of page.listings) putSale(listing, { prepend: false });
  state.saleNext = page.next_before_id ?? null;
}

async function loadLists() {
  try {
    await Promise.all([loadMine(), loadSale()]);
    state.loaded = true;
    state.error = "";
  } catch (error) {
    state.error = `Could not load the NFTs: ${error.message}`;
  }
  draw();
}

async function loadMore(which) {
  state.loadingMore = which;
  draw();
  try {
    await (which === "mine" ? loadMine({ more: true }) : loadSale({ more: true }));
    state.error = "";
  } catch (error) {
    state.error = `Could not load more: ${error.message}`;
  } finally {
    state.loadingMore = "";
    draw();
  }
}

// --- live updates (market:nfts) ---------------------------------------------------------------

function applyEvent(event) {
  const data = event.data;
  if (event.type === "nft_minted") {
    if (data.owner_wallet === state.address && state.address) putMine({ ...data, listing: state.mine.get(data.id)?.listing ?? null });
  } else if (event.type === "nft_listed") {
    if (data.seller_wallet === state.address && state.mine.has(data.nft_id)) {
      if (!closedListings.has(data.id)) putMine({ ...state.mine.get(data.nft_id), listing: data });
    } else putSale(data);
  } else if (event.type === "nft_sold" || event.type === "nft_listing_cancelled") {
    closedListings.add(data.id);
    dropSale(data.id);
    const sold = event.type === "nft_sold";
    if (data.seller_wallet === state.address && state.address) {
      if (sold) {
        dropMine(data.nft_id);
        state.notice = `Your NFT “${nftName(data.nft)}” was sold for ${formatAmount(data.price)} KVP.`;
        loadBalance().catch(() => {});
        context.wallet.refresh().catch(() => {});
      } else if (state.mine.get(data.nft_id)?.listing?.id === data.id) {
        putMine({ ...state.mine.get(data.nft_id), listing: null });
      }
    }
    if (sold && data.buyer_wallet === state.address && state.address) putMine({ ...data.nft, listing: null });
  } else return;
  applyToDetail(event);
  draw();
}

function applyToDetail(event) {
  const { detail } = state;
  const data = event.data;
  const nftId = event.type === "nft_minted" ? data.id : data.nft_id;
  if (!detail.nft || detail.id !== nftId) return;
  if (event.type === "nft_listed" && !closedListings.has(data.id)) detail.nft = { ...detail.nft, listing: data };
  else if (event.type === "nft_sold") detail.nft = { ...detail.nft, ...data.nft, listing: null };
  else if (event.type === "nft_listing_cancelled" && detail.nft.listing?.id === data.id) detail.nft = { ...detail.nft, listing: null };
}

// --- actions ----------------------------------------------------------------------------------

function cardError(key, text) {
  if (text) state.cardErrors.set(key, text);
  else state.cardErrors.delete(key);
}

function validateMint(values) {
  const errors = {};
  if (!values.name) errors.name = "Give the NFT a name.";
  else if (values.name.length > 100) errors.name = "The name is longer than 100 characters.";
  if (values.description.length > 2000) errors.description = "The description is longer than 2000 characters.";
  if (values.image && !/^(https?|ipfs):\/\/\S+$/i.test(values.image)) errors.image = "The image must be an http://, https:// or ipfs:// address.";
  else if (values.image.length > 2048) errors.image = "The image address is longer than 2048 characters.";
  const bad = values.attributes.find((a) => !a.trait_type || a.trait_type.length > 50 || a.value.length > 200);
  if (bad) errors.attributes = "Each attribute needs a name (up to 50 characters) and a value (up to 200).";
  return errors;
}

async function submitMint(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const data = new FormData(form);
  const text = (name) => String(data.get(name) ?? "").trim();
  const attributes = state.mint.attributes.map((key) => ({ trait_type: text(`trait-${key}`), value: text(`value-${key}`) }))
    .filter((a) => a.trait_type || a.value);
  const values = { name: text("name"), description: text("description"), image: text("image"), attributes };
  const m = state.mint;
  m.errors = validateMint(values);
  m.error = Object.keys(m.errors).length ? "Nothing was minted: check the fields marked below." : "";
  if (m.error) {
    draw();
    form.querySelector(`[aria-invalid="true"]`)?.focus();
    return;
  }
  const metadata = { name: values.name };
  if (values.description) metadata.description = values.description;
  if (values.image) metadata.image = values.image;
  if (attributes.length) metadata.attributes = attributes;
  const body = { metadata };
  if (text("game_id")) body.game_id = Number(text("game_id"));
  m.busy = true;
  state.notice = "";
  draw();
  try {
    await ensureAddress();
    const nft = await context.api("POST", "/api/v1/nfts", body);
    putMine({ ...nft, listing: null });
    form.reset();
    Object.assign(m, { errors: {}, error: "", attributes: [m.nextAttribute], nextAttribute: m.nextAttribute + 1 });
    state.notice = `Minted “${nftName(nft)}”: it is in your NFTs.`;
  } catch (error) {
    const field = error.field?.replace(/^metadata\./, "").split(".")[0];
    if (field && ["name", "description", "image", "attributes"].includes(field)) m.errors = { [field]: error.message };
    m.error = error.code === "rate_limited" ? `Too many mints at once: try again in ${error.retryAfter ?? "a few"} s.`
      : `Nothing was minted: ${error.message}`;
  } finally {
    m.busy = false;
    draw();
  }
}

function addAttribute() {
  state.mint.attributes = [...state.mint.attributes, state.mint.nextAttribute++];
  draw();
}

function removeAttribute(key) {
  state.mint.attributes = state.mint.attributes.filter((k) => k !== key);
  draw();
}

async function listForSale(event, nft) {
  event.preventDefault();
  const price = String(new FormData(event.currentTarget).get("price") ?? "").trim();
  if (!PRICE.test(price) || units(price) === 0n || units(price) > units("1000000000")) {
    cardError(nft.id, "Enter a price above 0 KVP, with at most 8 decimals (up to 1000000000).");
    draw();
    return;
  }
  cardError(nft.id, "");
  state.notice = "";
  setBusy(`list:${nft.id}`, true);
  try {
    const listing = await context.api("POST", "/api/v1/nft-listings", { nft_id: nft.id, price });
    if (state.mine.has(nft.id)) putMine({ ...state.mine.get(nft.id), listing });
    if (state.detail.id === nft.id && state.detail.nft) state.detail.nft = { ...state.detail.nft, listing };
    state.notice = `“${nftName(nft)}” is for sale at ${formatAmount(listing.price)} KVP.`;
  } catch (error) {
    cardError(nft.id, error.code === "conflict" ? "This NFT is already listed for sale." : `Not listed: ${error.message}`);
    if (error.code === "conflict") refreshNft(nft.id);
  } finally {
    setBusy(`list:${nft.id}`, false);
  }
}

async function cancelListing(nft, listing) {
  cardError(nft.id, "");
  state.notice = "";
  setBusy(`cancel:${listing.id}`, true);
  try {
    await context.api("POST", `/api/v1/nft-listings/${listing.id}/cancel`);
    closedListings.add(listing.id);
    if (state.mine.has(nft.id)) putMine({ ...state.mine.get(nft.id), listing: null });
    if (state.detail.id === nft.id && state.detail.nft) state.detail.nft = { ...state.detail.nft, listing: null };
    state.notice = `“${nftName(nft)}” is no longer for sale.`;
  } catch (error) {
    cardError(nft.id, error.code === "conflict" ? "This listing has already been sold or cancelled." : `Not cancelled: ${error.message}`);
    refreshNft(nft.id);
  } finally {
    setBusy(`cancel:${listing.id}`, false);
  }
}

/** Re-read one NFT after a refusal: the page's copy was behind. */
function refreshNft(nftId) {
  context.api("GET", `/api/v1/nfts/${nftId}`).then((nft) => {
    if (nft.owner_wallet === state.address) putMine(nft);
    else dropMine(nftId);
    if (state.detail.id === nftId) state.detail.nft = nft;
    draw();
  }, () => {});
}

/** Buy: check the funds, then ask, with the amount and the currency. */
async function askToBuy(listing) {
  const key = `l${listing.id}`;
  cardError(key, "");
  state.notice = "";
  setBusy(`buy:${listing.id}`, true);
  try {
    await ensureAddress();
    await loadBalance();
    if (units(state.available ?? "0") < units(listing.price)) {
      cardError(key, `Not enough KVP: this costs ${formatAmount(listing.price)} KVP and you have ${formatAmount(state.available ?? "0")} KVP` +
        " available. Get demo funds in the Purchases tab.");
      return;
    }
    state.buyError = "";
    state.buying = listing;
  } catch (error) {
    cardError(key, error.message);
  } finally {
    setBusy(`buy:${listing.id}`, false);
  }
}

async function confirmBuy() {
  const listing = state.buying;
  if (!listing) return;
  state.buyError = "";
  setBusy(`buy:${listing.id}`, true);
  try {
    const sold = await context.api("POST", `/api/v1/nft-listings/${listing.id}/buy`);
    closedListings.add(listing.id);
    dropSale(listing.id);
    putMine({ ...sold.nft, listing: null });
    if (state.detail.id === listing.nft_id) state.detail.nft = { ...sold.nft, listing: null };
    state.buying = null;
    state.notice = `You bought “${nftName(sold.nft)}” for ${formatAmount(sold.price)} KVP: it is in your NFTs.`;
    loadBalance().catch(() => {});
    context.wallet.refresh().catch(() => {});
  } catch (error) {
    if (error.code === "conflict" && error.field === "listing_id") {
      closedListings.add(listing.id);
      dropSale(listing.id);
      if (state.detail.id === listing.nft_id) refreshNft(listing.nft_id);
      state.buying = null;
      state.buyError = "";
      cardError(`l${listing.id}`, "");
      state.notice = `“${nftName(listing.nft)}” is no longer for sale: someone else bought it, or its seller withdrew it.`;
    } else if (error.code === "conflict" && error.field === "price") {
      state.buyError = `Not enough KVP: ${error.message}. Get demo funds in the Purchases tab.`;
    } else state.buyError = `Not bought: ${error.message}`;
  } finally {
    setBusy(`buy:${listing.id}`, false);
  }
}

function closeBuy() {
  state.buying = null;
  state.buyError = "";
  draw();
}

// --- one NFT's page ---------------------------------------------------------------------------

async function openNft(id) {
  Object.assign(state.detail, { id, nft: null, error: "", loading: true });
  draw();
  try {
    const nft = await context.api("GET", `/api/v1/nfts/${id}`);
    if (state.detail.id === id) state.detail.nft = nft;
  } catch (error) {
    if (state.detail.id === id) state.detail.error = error.code === "not_found" ? `There is no NFT #${id}.` : `Could not load this NFT: ${error.message}`;
  } finally {
    if (state.detail.id === id) state.detail.loading = false;
    draw();
  }
}

// --- components -------------------------------------------------------------------------------

/** The NFT's picture when it is on this site; other origins are never loaded (the page's CSP). */
function Picture({ nft }) {
  const image = nft.metadata?.image;
  let sameOrigin = false;
  try {
    sameOrigin = Boolean(image) && new URL(image).origin === location.origin;
  } catch { /* not a URL the browser reads */ }
  if (sameOrigin) return html`<img class="nft-picture" src=${image} alt="" />`;
  const initial = (nftName(nft).trim()[0] ?? "?").toUpperCase();
  return html`<div class="nft-picture nft-placeholder" aria-hidden="true" data-hue=${String(nft.id % 6)}>${initial}</div>`;
}

function ImageLink({ nft }) {
  const image = nft.metadata?.image;
  if (!image) return null;
  if (/^https?:\/\//i.test(image)) {
    return html`<a class="nft-image-link" href=${image} target="_blank" rel="noopener noreferrer">Image (opens another site)</a>`;
  }
  return html`<span class="nft-image-link">Image: <code>${image}</code></span>`;
}

function ListForm({ nft }) {
  const busy = state.busy.has(`list:${nft.id}`);
  return html`<form class="nft-list-form" novalidate onSubmit=${(event) => listForSale(event, nft)}>
    <label>Price in KVP <input name="price" inputmode="decimal" autocomplete="off" placeholder="e.g. 2.5" required
      aria-label=${`Price in KVP for ${nftName(nft)}`} /></label>
    <button type="submit" disabled=${busy}>${busy ? "Listing…" : "List for sale"}</button>
  </form>`;
}

function MyCard({ nft }) {
  const listing = nft.listing;
  const cancelling = listing && state.busy.has(`cancel:${listing.id}`);
  return html`<li class="nft-card" data-key=${String(nft.id)} data-nft-id=${String(nft.id)} data-listed=${String(Boolean(listing))}>
    <${Picture} nft=${nft} />
    <div class="nft-body">
      <h4><a href=${`#/nfts/${nft.id}`}>${nftName(nft)}</a></h4>
      ${nft.metadata?.description ? html`<p class="nft-description">${nft.metadata.description}</p>` : null}
      ${listing ? html`<p class="nft-price">For sale at ${formatAmount(listing.price)} KVP</p>
          <button type="button" class="nft-cancel" disabled=${cancelling} onClick=${() => cancelListing(nft, listing)}
            aria-label=${`Cancel the listing of ${nftName(nft)}`}>${cancelling ? "Cancelling…" : "Cancel listing"}</button>`
        : html`<${ListForm} nft=${nft} />`}
      <p class="error" role="alert">${state.cardErrors.get(nft.id) ?? ""}</p>
    </div>
  </li>`;
}

function SaleCard({ listing }) {
  const nft = listing.nft;
  const busy = state.busy.has(`buy:${listing.id}`);
  return html`<li class="nft-card" data-key=${String(listing.id)} data-listing-id=${String(listing.id)} data-nft-id=${String(listing.nft_id)}>
    <${Picture} nft=${nft} />
    <div class="nft-body">
      <h4><a href=${`#/nfts/${listing.nft_id}`}>${nftName(nft)}</a></h4>
      ${nft.metadata?.description ? html`<p class="nft-description">${nft.metadata.description}</p>` : null}
      <p class="nft-price">${formatAmount(listing.price)} KVP</p>
      <p class="nft-meta">Seller <span title=${listing.seller_wallet}>${ownerName(listing.seller_wallet)}</span> · listed ${formatDate(listing.created_at)}</p>
      <button type="button" class="nft-buy" disabled=${busy} onClick=${() => askToBuy(listing)}
        aria-label=${`Buy ${nftName(nft)} for ${formatAmount(listing.price)} KVP`}>${busy ? "Checking…" : "Buy"}</button>
      <p class="error" role="alert">${state.cardErrors.get(`l${listing.id}`) ?? ""}</p>
    </div>
  </li>`;
}

function MintForm() {
  const m = state.mint;
  const field = (name) => ({ name, "aria-invalid": m.errors[name] ? "true" : undefined, "aria-describedby": `nft-error-${name}` });
  const details = useRef(null);
  const empty = state.loaded && !state.mineOrder.length;
  useEffect(() => { if (empty && details.current) details.current.open = true; }, [empty]); // opened for a first NFT
  return html`<details class="nft-mint" ref=${details}>
    <summary>Mint an NFT</summary>
    <form id="nft-mint-form" novalidate onSubmit=${submitMint}>
      <label>Name <input ...${field("name")} maxlength="100" required autocomplete="off" /></label>
      <p class="error" id="nft-error-name">${m.errors.name ?? ""}</p>
      <label>Description (optional) <textarea ...${field("description")} rows="3" maxlength="2000"></textarea></label>
      <p class="error" id="nft-error-description">${m.errors.description ?? ""}</p>
      <label>Image address (optional) <input ...${field("image")} type="url" inputmode="url" maxlength="2048"
        placeholder="https://… or ipfs://…" /></label>
      <p class="error" id="nft-error-image">${m.errors.image ?? ""}</p>
      <fieldset class="nft-attributes" aria-describedby="nft-error-attributes">
        <legend>Attributes (optional)</legend>
        ${m.attributes.map((key, index) => html`<div class="nft-attribute" key=${key}>
          <label>Name <input name=${`trait-${key}`} maxlength="50" aria-label=${`Attribute ${index + 1} name`} /></label>
          <label>Value <input name=${`value-${key}`} maxlength="200" aria-label=${`Attribute ${index + 1} value`} /></label>
          <button type="button" onClick=${() => removeAttribute(key)} aria-label=${`Remove attribute ${index + 1}`}>Remove</button>
        </div>`)}
        <button type="button" onClick=${addAttribute} disabled=${m.attributes.length >= 50}>Add an attribute</button>
      </fieldset>
      <p class="error" id="nft-error-attributes">${m.errors.attributes ?? ""}</p>
      ${state.games.length ? html`<label>Game (optional) <select name="game_id">
          <option value="">None</option>
          ${state.games.map((game) => html`<option key=${game.game_id} value=${String(game.game_id)}>${game.name}</option>`)}
        </select></label>` : null}
      <p class="error" role="alert">${m.error}</p>
      <button type="submit" class="nft-primary" disabled=${m.busy}>${m.busy ? "Minting…" : "Mint"}</button>
    </form>
  </details>`;
}

function BuyDialog() {
  const dialog = useRef(null);
  const listing = state.buying;
  useEffect(() => {
    const node = dialog.current;
    if (!node) return;
    if (listing && !node.open) node.showModal();
    else if (!listing && node.open) node.close();
  }, [listing]);
  const busy = listing && state.busy.has(`buy:${listing.id}`);
  return html`<dialog id="nft-buy-dialog" ref=${dialog} aria-labelledby="nft-buy-title" aria-describedby="nft-buy-text"
      onClose=${() => { if (state.buying) closeBuy(); }}>
    ${listing ? html`<form method="dialog" onSubmit=${(event) => { event.preventDefault(); confirmBuy(); }}>
      <h2 id="nft-buy-title">Buy “${nftName(listing.nft)}”?</h2>
      <p id="nft-buy-text">You pay <strong>${formatAmount(listing.price)} KVP</strong> from your KVP balance
        (${formatAmount(state.available ?? "0")} KVP available) to the seller ${ownerName(listing.seller_wallet)}.
        The NFT moves to your wallet at once; the payment cannot be undone.</p>
      <p class="error" role="alert">${state.buyError}</p>
      <div class="nft-actions">
        <button type="button" onClick=${closeBuy}>Cancel</button>
        <button type="submit" class="nft-primary" disabled=${busy} autofocus>${busy ? "Paying…" : `Pay ${formatAmount(listing.price)} KVP`}</button>
      </div>
    </form>` : null}
  </dialog>`;
}

function Lists() {
  const mine = state.mineOrder.map((id) => state.mine.get(id)).filter(Boolean);
  const sale = state.saleOrder.map((id) => state.sale.get(id)).filter(Boolean);
  return html`<div class="nft-page">
    <h2>NFTs</h2>
    <p class="nft-wallet">${state.address === null ? "You have no wallet yet: minting or buying makes one in this browser."
      : state.address ? html`Your wallet <span title=${state.address}>${shortAddress(state.address)}</span>
        ${state.available !== null ? html` · <strong>${formatAmount(state.available)} KVP</strong> available` : null}` : ""}</p>
    <p class="nft-notice" role="status" aria-live="polite">${state.notice}</p>
    <p class="error" role="alert">${state.error}</p>
    <${MintForm} />
    <section aria-labelledby="nft-mine-title">
      <h3 id="nft-mine-title">My NFTs</h3>
      ${!state.loaded && !state.error ? html`<p role="status">Loading…</p>` : null}
      <ul id="nft-mine" class="nft-grid" aria-labelledby="nft-mine-title">
        ${mine.map((nft) => html`<${MyCard} key=${nft.id} nft=${nft} />`)}
      </ul>
      ${state.loaded && !mine.length ? html`<p class="nft-empty">You own no NFTs yet. Mint one above, or buy one below.</p>` : null}
      ${state.mineNext ? html`<button type="button" disabled=${state.loadingMore === "mine"} onClick=${() => loadMore("mine")}>
        More of my NFTs</button>` : null}
    </section>
    <section aria-labelledby="nft-sale-title">
      <h3 id="nft-sale-title">For sale</h3>
      <ul id="nft-sale" class="nft-grid" aria-labelledby="nft-sale-title" aria-live="polite" aria-relevant="additions removals">
        ${sale.map((listing) => html`<${SaleCard} key=${listing.id} listing=${listing} />`)}
      </ul>
      ${state.loaded && !sale.length ? html`<p class="nft-empty">No one else has an NFT for sale right now. New listings show up here as they are made.</p>` : null}
      ${state.saleNext ? html`<button type="button" disabled=${state.loadingMore === "sale"} onClick=${() => loadMore("sale")}>
        More NFTs for sale</button>` : null}
    </section>
  </div>`;
}

function NftPage() {
  const { detail } = state;
  const nft = detail.nft;
  const heading = useRef(null);
  useEffect(() => { heading.current?.focus(); }, [detail.id, Boolean(nft)]); // the loaded page has its own heading
  const back = html`<p><a class="nft-back" href="#/nfts">← All NFTs</a></p>`;
  if (!nft) {
    return html`<article class="nft-page nft-detail" aria-labelledby="nft-detail-title">${back}
      <h2 id="nft-detail-title" tabindex="-1" ref=${heading}>NFT #${detail.id}</h2>
      <p class="error" role="alert">${detail.error}</p>${detail.loading ? html`<p role="status">Loading…</p>` : null}</article>`;
  }
  const mine = Boolean(state.address) && nft.owner_wallet === state.address;
  const listing = nft.listing;
  const attributes = nft.metadata?.attributes ?? [];
  const buyable = listing && !mine && listing.seller_wallet !== state.address;
  const cardKey = listing ? `l${listing.id}` : nft.id;
  return html`<article class="nft-page nft-detail" data-nft-id=${String(nft.id)} aria-labelledby="nft-detail-title">
    ${back}
    <div class="nft-detail-grid">
      <${Picture} nft=${nft} />
      <div>
        <h2 id="nft-detail-title" tabindex="-1" ref=${heading}>${nftName(nft)}</h2>
        <p class="nft-notice" role="status" aria-live="polite">${state.notice}</p>
        ${nft.metadata?.description ? html`<p class="nft-description">${nft.metadata.description}</p>` : null}
        <dl class="nft-facts">
          <dt>Owner</dt><dd class="nft-owner" title=${nft.owner_wallet}>${ownerName(nft.owner_wallet)}</dd>
          <dt>Minted</dt><dd>${formatDate(nft.created_at)}</dd>
          ${nft.game_id != null ? html`<dt>Game</dt><dd>${state.games.find((g) => g.game_id === nft.game_id)?.name ?? `#${nft.game_id}`}</dd>` : null}
          <dt>Status</dt><dd class="nft-status" aria-live="polite">${listing ? `For sale at ${formatAmount(listing.price)} KVP` : "Not for sale"}</dd>
        </dl>
        <${ImageLink} nft=${nft} />
        ${attributes.length ? html`<h3>Attributes</h3><dl class="nft-facts">${attributes.map((a, i) => html`<div key=${i} class="nft-fact">
          <dt>${a.trait_type}</dt><dd>${String(a.value)}</dd></div>`)}</dl>` : null}
        <div class="nft-actions">
          ${mine && listing ? html`<button type="button" disabled=${state.busy.has(`cancel:${listing.id}`)}
              onClick=${() => cancelListing(nft, listing)}>Cancel listing</button>` : null}
          ${mine && !listing ? html`<${ListForm} nft=${nft} />` : null}
          ${buyable ? html`<button type="button" class="nft-primary" disabled=${state.busy.has(`buy:${listing.id}`)}
              onClick=${() => askToBuy({ ...listing, nft })}>Buy for ${formatAmount(listing.price)} KVP</button>` : null}
        </div>
        <p class="error" role="alert">${state.cardErrors.get(cardKey) ?? ""}</p>
      </div>
    </div>
  </article>`;
}

function NftsView() {
  return html`${state.view === "nft" ? html`<${NftPage} />` : html`<${Lists} />`}<${BuyDialog} />`;
}

// --- the view contract ------------------------------------------------------------------------

/** Load my NFTs and the open listings, following `market:nfts` from before the first read. */
export async function start(ctx) {
  context = ctx;
  root = document.getElementById("nfts-root");
  markReady();
  draw();
  const subscription = context.hub.subscribe("/marketplace", "market:nfts", {
    onEvent(event) {
      if (pending) pending.push(event);
      else applyEvent(event);
    },
    onGap: () => loadLists(),
  });
  subscription.catch(() => {}); // awaited below
  context.api("GET", "/api/v1/games?limit=100").then((data) => { state.games = data.games ?? []; draw(); }, () => {});
  try {
    await loadAddress();
  } catch (error) {
    state.error = `Could not read your wallet: ${error.message}`;
  }
  await Promise.all([loadLists(), loadBalance().catch(() => {})]);
  const early = pending;
  pending = null;
  early.forEach(applyEvent);
  await subscription.catch((error) => { state.error = `Live updates are unavailable: ${error.message}`; draw(); });
}

/** #/nfts (the lists) or #/nfts/<id> (one NFT). */
export async function route(path) {
  await ready;
  state.notice = "";
  const [first] = path.split("/");
  if (/^\d+$/.test(first ?? "")) {
    state.view = "nft";
    await openNft(Number(first));
    return;
  }
  state.view = "list";
  state.detail.id = null;
  draw();
  if (state.address === null && state.loaded) {
    // A wallet made meanwhile elsewhere in the page (Purchases): its NFTs and balance show now.
    if (await loadAddress().catch(() => null)) await Promise.all([loadLists(), loadBalance().catch(() => {})]);
    draw();
  }
}
