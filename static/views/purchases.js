// The Purchases view (#/purchases): the wallet (its key in this browser only, backup and restore,
// demo funds), paying for a DataPod into escrow, and each purchase's progress, escrow and download.
import { api } from "../hub.js";
import { $, element, formatAmount, upsert } from "../ui.js";
import { addressOf, BackupError, createBackup, generateWalletKey, openBackup, parseBackup } from "../wallet-backup.js";
import { purchaseCompleted, refreshBuyControls } from "./marketplace.js";

let hub = null;
let me = null;
let openTab = null;

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

// Loading, creating and restoring each read `wallet` then write it, across awaits: they run one at a
// time, or a load begun at sign-in that read "no key" before a first Buy made one would then overwrite
// that key with null, and the account's new wallet could no longer pay from this browser.
let walletTurn = Promise.resolve();
const oneAtATime = (action) => (...args) => {
  const turn = walletTurn.then(() => action(...args));
  walletTurn = turn.catch(() => {});
  return turn;
};

const loadWallet = oneAtATime(async () => {
  const stored = (await keyStore("readonly", (store) => store.get(me.id))) ?? null;
  wallet.address = (await api("GET", "/api/v1/me/wallet")).address;
  // A key kept for another wallet than the account's (an older one, a mix-up) cannot pay for it.
  wallet.key = stored && (!wallet.address || (await addressOf(stored.publicKey)) === wallet.address) ? stored : null;
  wallet.demo = wallet.key ? null : await demoBackup().catch(() => null);
  await showWallet();
});

/** The signed-in user's wallet, made and registered on first use; throws when its key is elsewhere. */
const ensureWallet = oneAtATime(async () => {
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
});

/**
 * Take a key from a backup: it must be this account's registered wallet (or, for an account with
 * none yet, it becomes it). Kept in this browser only once it is known to fit.
 */
const restoreWallet = oneAtATime(async (backup, passphrase) => {
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
});

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
export const walletApi = {
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

// A purchase that gives (or is about to give) the buyer the dataset: the pod is theirs, no second Buy.
const OWNING_STATUSES = ["pending_payment", "processing", "completed"];

/** The signed-in user's purchase of a pod that makes it theirs, if any. */
export const ownPurchaseOf = (podId) => [...purchases.values()].find((p) => p.datapod_id === podId && OWNING_STATUSES.includes(p.status));

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
export async function buyDatapod(pod) {
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
export async function download(purchaseId) {
  const link = await api("POST", `/api/v1/purchases/${purchaseId}/download-link`);
  // The server's Content-Disposition names the file; `download` keeps the page where it is.
  const anchor = element("a", { href: link.url, download: "", rel: "noreferrer" });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
}

/** The wallet and the user's purchases, followed live. */
export async function start(context) {
  ({ hub, me, openTab } = context);
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
      if (event.data.status === "completed") purchaseCompleted(event.data.datapod_id);
    },
  });
}

/** The wallet again, when it failed to load while the hub was unreachable. */
export function retry() {
  if (me && $("#wallet-error").textContent) {
    loadWallet().then(() => { $("#wallet-error").textContent = ""; }, () => {});
  }
}
