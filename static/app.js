// The page's shell: sign-in, the outage banner, the tabs and addresses; each view is a module in
// static/views/, all live through hub.js.
import { api, Hub, HubError, session, sessionEvents } from "./hub.js";
import { $ } from "./ui.js";
import * as account from "./views/account.js";
import * as assistant from "./views/assistant.js";
import * as chain from "./views/chain.js";
import * as dao from "./views/dao.js";
import * as games from "./views/games.js";
import * as kyc from "./views/kyc.js";
import * as marketplace from "./views/marketplace.js";
import * as nfts from "./views/nfts.js";
import * as purchases from "./views/purchases.js";
import * as studio from "./views/studio.js";

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
  for (const view of Object.values(VIEW_MODULES)) view.retry?.();
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
// page shows the sign-in form (the marketplace for visitors, another way in), and retry(), run
// when the hub is reachable again (to re-read what failed meanwhile and clear its error).
const VIEW_MODULES = { marketplace, purchases, studio, assistant, chain, games, dao, nfts, kyc, account };
const VIEWS = Object.keys(VIEW_MODULES);
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

/** Show what the address names: a DataPod page (#/datapods/<id>), a view (#/<view>), else the marketplace. */
async function route() {
  const match = marketplace.DATAPOD_ROUTE.exec(location.hash);
  if (match) {
    showTab("marketplace");
    await marketplace.openDatapod(match[1].toLowerCase());
    return;
  }
  marketplace.closeDatapod();
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
    await Promise.all([route(), ...Object.values(VIEW_MODULES).map((view) => view.signedOut?.({ api }))]);
    return;
  }
  $("#whoami").textContent = me.username;
  hub.reauthenticate();
  const context = { hub, api, me, datapodCard: marketplace.datapodCard, openTab, wallet: purchases.walletApi };
  // Every start runs up to its first await before route() runs: the views know the user first.
  const starts = Object.values(VIEW_MODULES).map((view) => view.start(context));
  await Promise.all([route(), ...starts]);
}

start();
