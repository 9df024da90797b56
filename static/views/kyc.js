// The KYC view (#/kyc): submit an identity document and follow its review; administrators also get
// the review queue (open the document, approve, or reject with a reason). Decisions reach the user
// live on their `user:<id>` channel (kyc_status_changed). Docs: docs/protocol.md, "KYC".
import { authorizedFetch } from "../hub.js";
import { html, render, useEffect, useRef } from "../vendor/preact-htm.module.js";
import { formatDate, formatSize } from "../ui.js";

const PAGE = 20;
const TYPES = [["passport", "Passport"], ["id_card", "Identity card"], ["license", "Driving licence"]];
const TYPE_NAMES = Object.fromEntries(TYPES);
const ACCEPTED = ["application/pdf", "image/png", "image/jpeg"];
const STATUS_TEXT = {
  none: "Not submitted",
  Pending: "Pending review",
  Approved: "Approved",
  Rejected: "Rejected",
};

let context = null;
let root = null;
let markReady;
const ready = new Promise((resolve) => { markReady = resolve; });

const state = {
  loaded: false,
  status: null, // {kyc_status, verified, submissions}
  error: "", // loading
  formError: "",
  notice: "",
  busy: false,
  queue: { filter: "Pending", items: [], next: null, loaded: false, error: "", notice: "", busy: new Set(), errors: new Map(), loadingMore: false },
  viewer: null, // {id, url, mediaType, name, error, loading}
};

const isAdmin = () => Boolean(context?.me && (context.me.is_admin === true || context.me.roles?.includes?.("admin")));
const typeName = (type) => TYPE_NAMES[type] ?? type;
const dateTime = (iso) => (iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "");

function draw() {
  if (root && context) render(html`<${KycView} />`, root);
}

// --- my status ----------------------------------------------------------------------------------

async function loadMine() {
  try {
    state.status = await context.api("GET", "/api/v1/me/kyc");
    state.loaded = true;
    state.error = "";
  } catch (error) {
    state.error = `Could not load your verification status: ${error.message}`;
  }
  draw();
}

/** What the user's status reads as: a new account is "Pending" in the database but has sent nothing. */
function myStatus() {
  const latest = state.status?.submissions?.[0];
  if (!latest) return { key: "none", latest: null };
  return { key: state.status.verified ? "Approved" : latest.status, latest };
}

function checkFile(file) {
  if (!file || !file.size) return "Choose the document's file (a PDF, PNG or JPEG scan or photo).";
  const known = ACCEPTED.includes(file.type) || /\.(pdf|png|jpe?g)$/i.test(file.name);
  if (!known) return "The document must be a PDF, PNG or JPEG file.";
  return "";
}

async function submitDocument(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const data = new FormData(form);
  const file = data.get("file");
  state.notice = "";
  state.formError = !data.get("document_type") ? "Choose the kind of document." : checkFile(file instanceof File ? file : null);
  if (state.formError) {
    draw();
    return;
  }
  state.busy = true;
  draw();
  try {
    const submission = await context.api("POST", "/api/v1/me/kyc", data);
    form.reset();
    state.formError = "";
    state.notice = submission.status === "Rejected"
      ? "Your document was checked automatically and refused: see the reason below."
      : "Your document was sent. An administrator reviews it; the decision shows here.";
    await loadMine();
  } catch (error) {
    state.formError = error.code === "payload_too_large" ? `The file is too large: ${error.message}`
      : error.code === "conflict" ? `Nothing was sent: ${error.message}` : `Nothing was sent: ${error.message}`;
    if (error.code === "conflict") await loadMine();
  } finally {
    state.busy = false;
    draw();
  }
}

// --- the review queue (administrators) ----------------------------------------------------------

async function loadQueue({ more = false } = {}) {
  const queue = state.queue;
  const params = new URLSearchParams({ status: queue.filter, limit: String(PAGE) });
  if (more && queue.next) params.set("after_id", String(queue.next));
  const filter = queue.filter;
  try {
    const page = await context.api("GET", `/api/v1/admin/kyc?${params}`);
    if (queue.filter !== filter) return;
    const known = new Set(queue.items.map((item) => item.id));
    queue.items = more ? [...queue.items, ...page.submissions.filter((item) => !known.has(item.id))] : page.submissions;
    queue.next = page.next_after_id ?? null;
    queue.loaded = true;
    queue.error = "";
  } catch (error) {
    queue.error = `Could not load the review queue: ${error.message}`;
  }
  draw();
}

async function queueMore() {
  state.queue.loadingMore = true;
  draw();
  await loadQueue({ more: true });
  state.queue.loadingMore = false;
  draw();
}

function chooseFilter(event) {
  state.queue.filter = event.currentTarget.value;
  state.queue.items = [];
  state.queue.loaded = false;
  state.queue.notice = "";
  draw();
  loadQueue();
}

function itemError(id, text) {
  if (text) state.queue.errors.set(id, text);
  else state.queue.errors.delete(id);
}

async function decide(event, item, decision) {
  const form = event.currentTarget.form;
  const reason = String(new FormData(form).get("reason") ?? "").trim();
  const queue = state.queue;
  queue.notice = "";
  if (decision === "reject" && !reason) {
    itemError(item.id, "Give the reason for the rejection: the user sees it.");
    draw();
    form.querySelector("textarea")?.focus();
    return;
  }
  if (reason.length > 1000) {
    itemError(item.id, "The reason is longer than 1000 characters.");
    draw();
    return;
  }
  itemError(item.id, "");
  queue.busy.add(item.id);
  draw();
  const who = item.user?.username ?? "the user";
  try {
    await context.api("POST", `/api/v1/admin/kyc/${item.id}/${decision}`, reason ? { reason } : {});
    queue.items = queue.items.filter((other) => other.id !== item.id);
    queue.notice = `${decision === "approve" ? "Approved" : "Rejected"} ${who}'s ${typeName(item.document_type).toLowerCase()}.`;
  } catch (error) {
    if (error.code === "conflict") {
      queue.items = queue.items.filter((other) => other.id !== item.id);
      queue.notice = `${who}'s submission was already decided by another administrator: ${error.message}`;
    } else if (error.code === "forbidden") itemError(item.id, "You cannot decide your own submission: another administrator must.");
    else itemError(item.id, `No decision was recorded: ${error.message}`);
  } finally {
    queue.busy.delete(item.id);
    draw();
  }
  if (queue.filter === "Pending" && queue.items.length < 5 && queue.next) loadQueue({ more: true });
}

/** Fetch the decrypted document with the administrator's token and show it (images) or offer it (PDF). */
async function openDocument(item) {
  closeDocument();
  const extension = { "application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg" }[item.media_type] ?? "bin";
  state.viewer = { id: item.id, url: null, mediaType: item.media_type, name: `kyc-${item.id}.${extension}`,
    title: `${item.user?.username ?? "User"}: ${typeName(item.document_type)}`, error: "", loading: true };
  draw();
  try {
    const response = await authorizedFetch(`/api/v1/admin/kyc/${item.id}/document`);
    if (!response.ok) {
      const envelope = await response.json().catch(() => null);
      throw new Error(envelope?.error?.message ?? `the server answered ${response.status}`);
    }
    const blob = await response.blob();
    if (state.viewer?.id !== item.id) return;
    state.viewer.url = URL.createObjectURL(blob);
    state.viewer.mediaType = blob.type || item.media_type;
  } catch (error) {
    if (state.viewer?.id === item.id) state.viewer.error = `Could not open the document: ${error.message}`;
  } finally {
    if (state.viewer?.id === item.id) state.viewer.loading = false;
    draw();
  }
}

function closeDocument() {
  if (state.viewer?.url) URL.revokeObjectURL(state.viewer.url);
  state.viewer = null;
  draw();
}

// --- components -------------------------------------------------------------------------------

function SubmissionRow({ submission }) {
  return html`<li data-key=${String(submission.id)} data-status=${submission.status}>
    <strong>${typeName(submission.document_type)}</strong> · sent ${dateTime(submission.submitted_at)} ·
    <span class=${`kyc-badge kyc-${submission.status.toLowerCase()}`}>${STATUS_TEXT[submission.status] ?? submission.status}</span>
    ${submission.remarks ? html`<p class="kyc-remarks">${submission.status === "Rejected" ? "Reason" : "Note"}: ${submission.remarks}</p>` : null}
  </li>`;
}

function MyVerification() {
  const { key, latest } = myStatus();
  const canSubmit = state.loaded && (key === "none" || key === "Rejected");
  const submissions = state.status?.submissions ?? [];
  return html`<section class="kyc-card" aria-labelledby="kyc-mine-title">
    <h3 id="kyc-mine-title">Your verification</h3>
    <p class="kyc-hint">Verified users may sell DataPods. Send one identity document; it is stored encrypted and only
      administrators can open it.</p>
    <p class="error" role="alert">${state.error}</p>
    ${!state.loaded && !state.error ? html`<p role="status">Loading…</p>` : null}
    ${state.loaded ? html`<div id="kyc-status" class="kyc-status" data-status=${key} aria-live="polite" aria-atomic="true">
      <p>Status: <span class=${`kyc-badge kyc-${key.toLowerCase()}`}>${STATUS_TEXT[key]}</span></p>
      ${key === "none" ? html`<p>You have not sent a document yet.</p>` : null}
      ${key === "Pending" ? html`<p>Your ${typeName(latest.document_type).toLowerCase()} is waiting for an administrator. The decision shows here as soon as it is taken.</p>` : null}
      ${key === "Approved" ? html`<p>Your identity is verified${latest?.decided_at ? ` since ${formatDate(latest.decided_at)}` : ""}. There is nothing more to send.</p>` : null}
      ${key === "Rejected" ? html`<p class="kyc-reason">Reason: ${latest?.remarks || "none was given"}. You may send another document.</p>` : null}
    </div>` : null}
    <p class="kyc-notice" role="status">${state.notice}</p>
    ${canSubmit ? html`<form id="kyc-form" novalidate onSubmit=${submitDocument}>
      <label>Kind of document <select name="document_type" required>
        ${TYPES.map(([value, label]) => html`<option key=${value} value=${value}>${label}</option>`)}
      </select></label>
      <label>Document (PDF, PNG or JPEG) <input type="file" name="file" required accept=".pdf,.png,.jpg,.jpeg,application/pdf,image/png,image/jpeg" /></label>
      <p class="error" role="alert">${state.formError}</p>
      <button type="submit" class="kyc-primary" disabled=${state.busy}>${state.busy ? "Sending…" : "Send the document"}</button>
    </form>` : null}
    ${submissions.length ? html`<details class="kyc-history"><summary>Your submissions (${submissions.length})</summary>
      <ul>${submissions.map((submission) => html`<${SubmissionRow} key=${submission.id} submission=${submission} />`)}</ul>
    </details>` : null}
  </section>`;
}

function QueueItem({ item }) {
  const queue = state.queue;
  const busy = queue.busy.has(item.id);
  const who = item.user?.username ?? "unknown user";
  const pending = item.status === "Pending";
  return html`<li class="kyc-item" data-key=${String(item.id)} data-kyc-id=${String(item.id)}>
    <p class="kyc-item-head"><strong>${who}</strong> · ${typeName(item.document_type)}
      <span class="kyc-muted"> · ${item.media_type}, ${formatSize(item.size)} · sent ${dateTime(item.submitted_at)}</span></p>
    ${!pending ? html`<p><span class=${`kyc-badge kyc-${item.status.toLowerCase()}`}>${STATUS_TEXT[item.status]}</span>
      ${item.decided_at ? ` on ${dateTime(item.decided_at)}` : ""}${item.remarks ? ` · ${item.remarks}` : ""}</p>` : null}
    <button type="button" onClick=${() => openDocument(item)} aria-label=${`Open ${who}'s document`}>Open the document</button>
    ${pending ? html`<form class="kyc-decision" onSubmit=${(event) => event.preventDefault()}>
      <label>Reason (shown to the user; needed to reject)
        <textarea name="reason" rows="2" maxlength="1000" aria-label=${`Reason for ${who}`}></textarea></label>
      <div class="kyc-actions">
        <button type="button" class="kyc-approve" disabled=${busy} onClick=${(event) => decide(event, item, "approve")}
          aria-label=${`Approve ${who}`}>Approve</button>
        <button type="button" class="kyc-reject" disabled=${busy} onClick=${(event) => decide(event, item, "reject")}
          aria-label=${`Reject ${who}`}>Reject</button>
      </div>
    </form>` : null}
    <p class="error" role="alert">${queue.errors.get(item.id) ?? ""}</p>
  </li>`;
}

function ReviewQueue() {
  const queue = state.queue;
  const empty = queue.filter === "Pending" ? "No document is waiting for review." : `No ${queue.filter.toLowerCase()} submissions.`;
  return html`<section class="kyc-card kyc-queue" id="kyc-queue" aria-labelledby="kyc-queue-title">
    <h3 id="kyc-queue-title">Review queue</h3>
    <p class="kyc-hint">You see this as an administrator. Oldest first; open the document before deciding.</p>
    <div class="kyc-queue-tools">
      <label>Show <select name="status" onChange=${chooseFilter} value=${queue.filter}>
        <option value="Pending">Waiting for review</option>
        <option value="Approved">Approved</option>
        <option value="Rejected">Rejected</option>
      </select></label>
      <button type="button" onClick=${() => loadQueue()}>Refresh</button>
    </div>
    <p class="kyc-notice" role="status">${queue.notice}</p>
    <p class="error" role="alert">${queue.error}</p>
    ${!queue.loaded && !queue.error ? html`<p role="status">Loading…</p>` : null}
    <ul class="kyc-list" aria-labelledby="kyc-queue-title">
      ${queue.items.map((item) => html`<${QueueItem} key=${item.id} item=${item} />`)}
    </ul>
    ${queue.loaded && !queue.items.length ? html`<p class="kyc-empty">${empty}</p>` : null}
    ${queue.next ? html`<button type="button" disabled=${queue.loadingMore} onClick=${queueMore}>Load more</button>` : null}
  </section>`;
}

function DocumentDialog() {
  const dialog = useRef(null);
  const viewer = state.viewer;
  useEffect(() => {
    const node = dialog.current;
    if (!node) return;
    if (viewer && !node.open) node.showModal();
    else if (!viewer && node.open) node.close();
  }, [viewer]);
  const image = viewer?.url && viewer.mediaType.startsWith("image/");
  return html`<dialog id="kyc-document" ref=${dialog} aria-labelledby="kyc-document-title" onClose=${() => { if (state.viewer) closeDocument(); }}>
    ${viewer ? html`<h2 id="kyc-document-title">${viewer.title}</h2>
      ${viewer.loading ? html`<p role="status">Decrypting the document…</p>` : null}
      <p class="error" role="alert">${viewer.error}</p>
      ${image ? html`<img class="kyc-image" src=${viewer.url} alt=${`The document sent by ${viewer.title}`} />` : null}
      ${viewer.url && !image ? html`<p>This PDF cannot be shown inside the page: download it to read it.</p>` : null}
      <div class="kyc-actions">
        ${viewer.url ? html`<a class="kyc-button" href=${viewer.url} download=${viewer.name}>Download</a>` : null}
        <button type="button" onClick=${closeDocument} autofocus>Close</button>
      </div>` : null}
  </dialog>`;
}

function KycView() {
  return html`<div class="kyc-page">
    <h2>Identity verification</h2>
    <${MyVerification} />
    ${isAdmin() ? html`<${ReviewQueue} /><${DocumentDialog} />` : null}
  </div>`;
}

// --- the view contract ------------------------------------------------------------------------

/** Read my status, follow its decisions live; an administrator also gets the queue. */
export async function start(ctx) {
  context = ctx;
  root = document.getElementById("kyc-root");
  markReady();
  draw();
  const subscription = context.hub.subscribe("/purchases", `user:${context.me.id}`, {
    onEvent(event) {
      if (event.type === "kyc_status_changed") {
        state.notice = "";
        loadMine();
      }
    },
    onGap: () => loadMine(),
  });
  await Promise.all([loadMine(), isAdmin() ? loadQueue() : null, subscription.catch(() => {})]);
}

/** #/kyc: re-read on each visit (the queue has no live channel). */
export async function route() {
  await ready;
  draw();
  await Promise.all([state.loaded ? loadMine() : null, isAdmin() && state.queue.loaded ? loadQueue() : null]);
}
