// The DAO view: the proposals with their live tallies (#/dao), a proposal's page with its description,
// deadline countdown, tally and signed voting (#/dao/<id>), and the form that opens one (#/dao/new).
// Votes are signed in this browser with the wallet key (docs/protocol.md, "DAO: proposals and
// signed votes"); tallies follow the `dao:<id>` channels of /chain.
import { html, render, useEffect, useRef, useState } from "../vendor/preact-htm.module.js";
import { formatDate } from "../ui.js";

const PAGE = 20;
const CHOICES = [["Yes", "yes"], ["No", "no"], ["Abstain", "abstain"]];
const MIN_AHEAD_MS = 60_000; // the server takes deadlines 60 s to 365 days ahead
const MAX_AHEAD_MS = 365 * 86_400_000;
const DEFAULT_AHEAD_MS = 7 * 86_400_000;
const FILTERS = [["", "All"], ["Open", "Open"], ["Closed", "Closed"]];
// A connection may hold 100 channels (MAX_CHANNELS_PER_CONNECTION), shared with the Explorer: past
// this many open proposals followed, further ones show the tally read with the list.
const WATCH_LIMIT = 50;

let context = null;
let root = null;
let markReady;
const ready = new Promise((resolve) => { markReady = resolve; });

const state = {
  view: "list", // "list", "new" or "proposal"
  filter: "",
  proposals: new Map(), // id -> the newest known <Proposal>
  order: [], // the ids the list shows, newest first
  next: null,
  loaded: false,
  listError: "",
  loadingMore: false,
  address: undefined, // this account's wallet address: undefined until known, null without one
  detail: { id: null, loading: false, error: "", notice: "", votes: null, voteError: "", voteNotice: "", voting: null },
  form: { errors: {}, error: "", busy: false, defaultDeadline: "" },
};
const watched = new Set(); // the proposal ids whose dao:<id> channel this page follows
let listRequest = 0;

// --- helpers ----------------------------------------------------------------------------------

const votesIn = (tally) => (tally?.yes ?? 0) + (tally?.no ?? 0) + (tally?.abstain ?? 0);
const percent = (count, total) => (total ? Math.round((count / total) * 100) : 0);
const shortAddress = (address) => (address && address.length > 16 ? `${address.slice(0, 10)}…${address.slice(-4)}` : address ?? "");

/** "2 d 4 h 3 min 9 s" (no break inside "9 s"); `coarse` drops the seconds (and the minutes past a day). */
export function duration(ms, { coarse = false } = {}) {
  let seconds = Math.max(0, Math.ceil(ms / 1000));
  const days = Math.floor(seconds / 86_400);
  seconds %= 86_400;
  const hours = Math.floor(seconds / 3600);
  seconds %= 3600;
  const minutes = Math.floor(seconds / 60);
  seconds %= 60;
  const parts = [];
  if (days) parts.push(`${days}\u00a0d`);
  if (days || hours) parts.push(`${hours}\u00a0h`);
  if (!(coarse && days)) parts.push(`${minutes}\u00a0min`);
  if (!coarse || (!days && !hours && minutes < 5)) parts.push(`${seconds}\u00a0s`);
  return parts.join(" ");
}

function localInputValue(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

const dateTime = (iso) => (iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "");

function creatorName(proposal) {
  if (context && proposal.creator_id === context.me.id) return "you";
  return shortAddress(proposal.creator_wallet);
}

/**
 * Keep the newest of what is known about a proposal: reads and events may arrive in any order, but
 * a tally only grows and a closed proposal stays closed, so the larger tally and Closed win.
 */
function merge(update) {
  const known = state.proposals.get(update.id);
  if (!known) {
    state.proposals.set(update.id, update);
    return update;
  }
  const merged = { ...known, ...update };
  if (votesIn(known.tally) > votesIn(update.tally)) merged.tally = known.tally;
  if (known.status === "Closed" && update.status !== "Closed") {
    Object.assign(merged, { status: "Closed", result: known.result, closed_at: known.closed_at });
  }
  state.proposals.set(update.id, merged);
  return merged;
}

function draw() {
  if (root && context) render(html`<${DaoView} />`, root);
}

async function myAddress() {
  if (state.address === undefined) state.address = (await context.api("GET", "/api/v1/me/wallet")).address ?? null;
  return state.address;
}

// --- live tallies ----------------------------------------------------------------------------

let votesTimer = null;

function applyEvent(id, event) {
  if (!state.proposals.has(id)) return;
  const { yes, no, abstain } = event.data;
  const tally = { yes, no, abstain };
  if (event.type === "tally_changed") merge({ id, tally });
  else if (event.type === "proposal_closed") {
    merge({ id, tally, status: "Closed", result: event.data.result, closed_at: event.data.closed_at });
  } else return;
  if (state.detail.id === id) {
    // The event has the counts only: the signed votes behind them are re-read (once per burst).
    clearTimeout(votesTimer);
    votesTimer = setTimeout(() => loadDetail(id).catch(() => {}), 400);
  }
  draw();
}

async function refresh(id) {
  merge(await context.api("GET", `/api/v1/proposals/${id}`));
  draw();
}

/** Follow a proposal's tally; resolves once the server has the page in the channel. */
async function watch(id) {
  if (watched.has(id)) return;
  watched.add(id);
  try {
    await context.hub.subscribe("/chain", `dao:${id}`, {
      onEvent: (event) => applyEvent(id, event),
      onGap: () => refresh(id).catch(() => {}),
    });
  } catch (error) {
    watched.delete(id);
    throw error;
  }
}

// --- the list ---------------------------------------------------------------------------------

function listParams(more) {
  const params = new URLSearchParams({ limit: String(PAGE) });
  if (state.filter) params.set("status", state.filter);
  if (more && state.next) params.set("before_id", String(state.next));
  return params;
}

async function loadList({ more = false } = {}) {
  const request = ++listRequest; // a slow answer to an older filter must not overwrite a newer one
  const params = listParams(more);
  try {
    const page = await context.api("GET", `/api/v1/proposals?${params}`);
    if (request !== listRequest) return;
    const ids = page.proposals.map((proposal) => merge(proposal).id);
    state.order = more ? [...state.order, ...ids.filter((id) => !state.order.includes(id))] : ids;
    state.next = page.next_before_id ?? null;
    state.loaded = true;
    state.listError = "";
    draw();
    const open = page.proposals.filter((proposal) => proposal.status === "Open" && !watched.has(proposal.id))
      .slice(0, Math.max(0, WATCH_LIMIT - watched.size));
    if (!open.length) return;
    await Promise.all(open.map((proposal) => watch(proposal.id)));
    // A vote cast between the read and the subscriptions is in this second read.
    const again = await context.api("GET", `/api/v1/proposals?${params}`);
    again.proposals.forEach(merge);
    draw();
  } catch (error) {
    if (request !== listRequest) return;
    state.listError = `Could not load the proposals: ${error.message}`;
    draw();
  }
}

let listLoading = null;

/** The list's first page, once for callers that come while it loads (start and route, at sign-in). */
function reloadList() {
  listLoading ??= loadList().finally(() => { listLoading = null; });
  return listLoading;
}

async function loadMore() {
  state.loadingMore = true;
  draw();
  try {
    await loadList({ more: true });
  } finally {
    state.loadingMore = false;
    draw();
  }
}

function chooseFilter(value) {
  if (state.filter === value) return;
  state.filter = value;
  state.next = null;
  state.loaded = false;
  draw();
  loadList();
}

// --- a proposal's page ------------------------------------------------------------------------

async function loadDetail(id) {
  const proposal = await context.api("GET", `/api/v1/proposals/${id}?votes=true`);
  if (state.detail.id !== id) return;
  const { votes, ...rest } = proposal;
  merge(rest);
  state.detail.votes = votes ?? [];
  state.detail.error = "";
  draw();
}

async function openProposal(id) {
  Object.assign(state.detail, { id, loading: true, error: "", notice: "", votes: null, voteError: "", voteNotice: "", voting: null });
  draw();
  await watch(id).catch((error) => { state.detail.notice = `Live updates are unavailable: ${error.message}`; });
  try {
    await Promise.all([loadDetail(id), myAddress().catch(() => null)]);
  } catch (error) {
    if (state.detail.id !== id) return;
    state.detail.error = error.code === "not_found" ? `There is no proposal #${id}.` : `Could not load this proposal: ${error.message}`;
  } finally {
    if (state.detail.id === id) state.detail.loading = false;
    draw();
  }
}

function voteErrorText(error) {
  if (error.code === "conflict" && error.field === "voter") return "You have already voted on this proposal: each wallet votes once.";
  if (error.code === "conflict" && error.field === "proposal_id") return "Voting on this proposal has closed: your vote was not counted.";
  if (error.code === "invalid_payload" && error.field === "signature") {
    return "The hub could not verify the signature: the key in this browser is not your registered wallet's key.";
  }
  if (!error.code) return `Your vote must be signed with your wallet key, and this browser cannot sign it. ${error.message}`;
  return `Your vote was not counted: ${error.message}`;
}

/** Sign the vote with this browser's wallet key (KVP-VOTE-V1) and send it. */
async function vote(id, choice) {
  const detail = state.detail;
  Object.assign(detail, { voteError: "", voteNotice: "", voting: choice });
  draw();
  try {
    await context.wallet.ensure(); // a clear error when the key is in another browser
    const voter = context.wallet.address();
    state.address = voter;
    const signature = await context.wallet.sign(["KVP-VOTE-V1", String(id), choice, voter].join("\n"));
    const cast = await context.api("POST", `/api/v1/proposals/${id}/votes`, { voter, choice, signature });
    const { tally, ...signed } = cast;
    merge({ id, tally });
    if (detail.id === id) {
      detail.votes = [...(detail.votes ?? []).filter((v) => v.voter !== voter), signed];
      detail.voteNotice = `Your vote “${choice}” is signed and counted.`;
    }
  } catch (error) {
    if (detail.id === id) detail.voteError = voteErrorText(error);
    if (error.code === "conflict") loadDetail(id).catch(() => {});
  } finally {
    if (detail.id === id) detail.voting = null;
    draw();
  }
}

// --- opening a proposal -----------------------------------------------------------------------

function validate(values) {
  const errors = {};
  if (!values.title) errors.title = "Give the proposal a title.";
  else if (values.title.length > 200) errors.title = "The title is longer than 200 characters.";
  if (!values.description) errors.description = "Describe what members vote on.";
  else if (values.description.length > 5000) errors.description = "The description is longer than 5000 characters.";
  const deadline = values.deadline ? new Date(values.deadline) : null;
  if (!deadline || Number.isNaN(deadline.getTime())) errors.deadline = "Choose the date and time voting ends.";
  else if (deadline.getTime() - Date.now() < MIN_AHEAD_MS) errors.deadline = "The deadline must be at least a minute from now.";
  else if (deadline.getTime() - Date.now() > MAX_AHEAD_MS) errors.deadline = "The deadline must be within a year from now.";
  return { errors, deadline };
}

async function submitProposal(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const data = new FormData(form);
  const values = { title: String(data.get("title") ?? "").trim(), description: String(data.get("description") ?? "").trim(),
    deadline: String(data.get("deadline") ?? "") };
  const { errors, deadline } = validate(values);
  const f = state.form;
  f.errors = errors;
  f.error = Object.keys(errors).length ? "The proposal was not opened: check the fields marked below." : "";
  if (f.error) {
    draw();
    form.querySelector(`[name="${Object.keys(errors)[0]}"]`)?.focus();
    return;
  }
  f.busy = true;
  draw();
  try {
    // Opening a proposal needs a registered wallet (not its key): one is made here when there is none.
    if (!(await myAddress())) {
      await context.wallet.ensure();
      state.address = context.wallet.address();
    }
    const created = await context.api("POST", "/api/v1/proposals",
      { title: values.title, description: values.description, deadline: deadline.toISOString() });
    merge(created);
    if (!state.order.includes(created.id) && state.filter !== "Closed") state.order = [created.id, ...state.order];
    form.reset();
    f.errors = {};
    f.error = "";
    location.hash = `#/dao/${created.id}`;
  } catch (error) {
    if (error.field && ["title", "description", "deadline"].includes(error.field)) f.errors = { [error.field]: error.message };
    f.error = `The proposal was not opened: ${error.message}`;
  } finally {
    f.busy = false;
    draw();
  }
}

// --- components -------------------------------------------------------------------------------

function useNow(interval = 1000) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), interval);
    return () => clearInterval(timer);
  }, [interval]);
  return now;
}

/** The time left to vote, ticking; at zero the proposal is re-read (the read closes it). */
function Countdown({ proposal, coarse = false }) {
  const now = useNow(1000);
  const left = Date.parse(proposal.deadline) - now;
  const ended = left <= 0;
  useEffect(() => {
    if (!ended || proposal.status !== "Open") return undefined;
    const timer = setTimeout(() => refresh(proposal.id).catch(() => {}), 1500);
    return () => clearTimeout(timer);
  }, [ended, proposal.status, proposal.id]);
  const text = ended ? "voting has ended, counting…" : `closes in ${duration(left, { coarse })}`;
  return html`<span class="dao-countdown" role="timer" aria-atomic="true">${text}</span>`;
}

/** A few announcements as the deadline nears, for screen readers (the ticking timer stays silent). */
function DeadlineAnnouncer({ proposal }) {
  const now = useNow(1000);
  const left = Date.parse(proposal.deadline) - now;
  const text = proposal.status !== "Open" ? "" : left <= 0 ? "Voting has ended."
    : left <= 60_000 ? "Less than a minute left to vote." : left <= 600_000 ? "Less than 10 minutes left to vote." : "";
  return html`<span class="dao-sr" aria-live="polite">${text}</span>`;
}

function Tally({ tally, live = false }) {
  const total = votesIn(tally);
  return html`<div class="dao-tally" aria-live=${live ? "polite" : undefined} aria-atomic=${live ? "true" : undefined}>
    ${CHOICES.map(([label, key]) => html`<div class="dao-bar-row" data-choice=${key} key=${key}>
      <span class="dao-bar-label">${label}</span>
      <span class="dao-bar" aria-hidden="true"><span class=${`dao-fill dao-fill-${key}`}
        style=${{ width: `${percent(tally?.[key] ?? 0, total)}%` }}></span></span>
      <span class="dao-bar-count">${tally?.[key] ?? 0} <span class="dao-muted">(${percent(tally?.[key] ?? 0, total)}%)</span></span>
    </div>`)}
    <p class="dao-total">${total} vote${total === 1 ? "" : "s"} cast</p>
  </div>`;
}

function StatusBadge({ proposal }) {
  const label = proposal.status === "Open" ? "Open" : `Closed · ${proposal.result ?? "counting"}`;
  const kind = proposal.status === "Open" ? "open" : (proposal.result ?? "closed").toLowerCase();
  return html`<span class=${`dao-badge dao-badge-${kind}`}>${label}</span>`;
}

function ProposalRow({ proposal }) {
  const tally = proposal.tally ?? {};
  const total = votesIn(tally);
  return html`<li class="dao-item" data-key=${String(proposal.id)} data-proposal-id=${String(proposal.id)} data-status=${proposal.status}>
    <h3 class="dao-item-title"><a href=${`#/dao/${proposal.id}`}>${proposal.title}</a></h3>
    <p class="dao-meta"><${StatusBadge} proposal=${proposal} />${" "}
      ${proposal.status === "Open" ? html`<${Countdown} proposal=${proposal} coarse=${true} />`
        : html`<span>ended ${formatDate(proposal.closed_at ?? proposal.deadline)}</span>`}
      <span class="dao-muted"> · by ${creatorName(proposal)}</span></p>
    <div class="dao-mini" aria-hidden="true">
      ${CHOICES.map(([, key]) => html`<span key=${key} class=${`dao-fill-${key}`} style=${{ width: `${percent(tally[key] ?? 0, total)}%` }}></span>`)}
    </div>
    <p class="tally">Yes ${tally.yes ?? 0} · No ${tally.no ?? 0} · Abstain ${tally.abstain ?? 0}</p>
  </li>`;
}

function ProposalList() {
  const proposals = state.order.map((id) => state.proposals.get(id)).filter(Boolean);
  const empty = state.filter === "Open" ? "No proposal is open for voting right now."
    : state.filter === "Closed" ? "No proposal has closed yet." : "No proposals yet: be the first to put a question to the members.";
  return html`<div class="dao-page">
    <div class="dao-head">
      <h2 id="dao-title">Proposals</h2>
      <a class="dao-button dao-primary" href="#/dao/new">New proposal</a>
    </div>
    <p class="dao-hint">Every member with a registered wallet has one vote per proposal, signed in their browser. A proposal
      passes when Yes votes outnumber No votes at its deadline.</p>
    <div class="dao-filters" role="group" aria-label="Show proposals">
      ${FILTERS.map(([value, label]) => html`<button type="button" key=${value || "all"} aria-pressed=${String(state.filter === value)}
        onClick=${() => chooseFilter(value)}>${label}</button>`)}
    </div>
    <p class="error" role="alert">${state.listError}</p>
    ${!state.loaded && !state.listError ? html`<p class="dao-hint" role="status">Loading proposals…</p>` : null}
    <ul id="proposals" class="dao-list" aria-labelledby="dao-title">
      ${proposals.map((proposal) => html`<${ProposalRow} key=${proposal.id} proposal=${proposal} />`)}
    </ul>
    ${state.loaded && !proposals.length ? html`<div class="dao-empty"><p>${empty}</p>
      <a class="dao-button" href="#/dao/new">Open a proposal</a></div>` : null}
    ${state.next ? html`<button type="button" class="dao-more" disabled=${state.loadingMore} onClick=${loadMore}>
      ${state.loadingMore ? "Loading…" : "Load more proposals"}</button>` : null}
  </div>`;
}

function VotePanel({ proposal }) {
  const detail = state.detail;
  const mine = detail.votes?.find((v) => state.address && v.voter === state.address);
  const open = proposal.status === "Open" && Date.parse(proposal.deadline) > Date.now();
  return html`<section class="dao-vote" aria-labelledby="dao-vote-title">
    <h3 id="dao-vote-title">Your vote</h3>
    ${mine ? html`<p class="dao-voted" data-choice=${mine.choice}>You voted <strong>${mine.choice}</strong>
        ${mine.timestamp ? html` on ${dateTime(mine.timestamp)}` : null}. Votes are final.</p>`
      : open ? html`<p class="dao-hint">Your vote is signed in this browser with your wallet key, and cannot be changed.</p>
        <div class="dao-choices">
          ${CHOICES.map(([choice, key]) => html`<button type="button" key=${key} class=${`dao-choice dao-choice-${key}`}
            disabled=${Boolean(detail.voting)} aria-busy=${detail.voting === choice ? "true" : undefined}
            onClick=${() => vote(proposal.id, choice)}>${detail.voting === choice ? "Signing…" : `Vote ${choice}`}</button>`)}
        </div>`
      : html`<p>Voting has closed.</p>`}
    <p class="dao-notice" role="status">${detail.voteNotice}</p>
    <p class="error" role="alert">${detail.voteError}</p>
  </section>`;
}

function ProposalPage() {
  const detail = state.detail;
  const proposal = state.proposals.get(detail.id);
  const heading = useRef(null);
  useEffect(() => { heading.current?.focus(); }, [detail.id, Boolean(proposal)]);
  const back = html`<p><a class="dao-back" href="#/dao">← All proposals</a></p>`;
  if (!proposal || (detail.error && !detail.votes)) {
    return html`<article class="dao-page dao-detail" aria-labelledby="dao-detail-title">${back}
      <h2 id="dao-detail-title" tabindex="-1" ref=${heading}>Proposal #${detail.id}</h2>
      <p class="error" role="alert">${detail.error}</p>
      ${detail.loading ? html`<p role="status">Loading…</p>` : null}</article>`;
  }
  const votes = detail.votes ?? [];
  return html`<article class="dao-page dao-detail" data-proposal-id=${String(proposal.id)} data-status=${proposal.status}
      aria-labelledby="dao-detail-title">
    ${back}
    <h2 id="dao-detail-title" tabindex="-1" ref=${heading}>${proposal.title}</h2>
    <p class="dao-meta"><${StatusBadge} proposal=${proposal} />
      <span class="dao-muted"> · proposal #${proposal.id} · opened by ${creatorName(proposal)} on ${formatDate(proposal.created_at)}</span></p>
    <p class="dao-notice" role="status">${detail.notice}</p>
    <p class="error" role="alert">${detail.error}</p>
    <div class="dao-deadline">
      <span>${proposal.status === "Open" ? "Voting ends" : "Voting ended"} </span>
      <time datetime=${proposal.deadline}>${dateTime(proposal.deadline)}</time>
      ${proposal.status === "Open" ? html`<span> · </span><${Countdown} proposal=${proposal} />` : null}
      <${DeadlineAnnouncer} proposal=${proposal} />
    </div>
    ${proposal.status === "Closed" ? html`<p class="dao-result" data-result=${proposal.result ?? ""}>
      Result: <strong>${proposal.result ?? "being counted"}</strong>${proposal.result === "Passed"
        ? " (Yes outnumbered No)." : proposal.result === "Rejected" ? " (Yes did not outnumber No)." : ""}</p>` : null}
    <h3>Description</h3>
    <p class="dao-description">${proposal.description}</p>
    <h3 id="dao-tally-title">Tally</h3>
    <${Tally} tally=${proposal.tally} live=${true} />
    <${VotePanel} proposal=${proposal} />
    <details class="dao-votes">
      <summary>Signed votes (${votes.length})</summary>
      ${votes.length ? html`<ul>${votes.map((v) => html`<li key=${v.id}><span title=${v.voter}>${v.voter === state.address ? "you"
        : shortAddress(v.voter)}</span> · <strong>${v.choice}</strong>${v.timestamp ? ` · ${dateTime(v.timestamp)}` : ""}</li>`)}</ul>`
        : html`<p>No votes yet.</p>`}
    </details>
  </article>`;
}

function NewProposal() {
  const f = state.form;
  const heading = useRef(null);
  useEffect(() => { heading.current?.focus(); }, []);
  const field = (name) => ({ name, "aria-invalid": f.errors[name] ? "true" : undefined, "aria-describedby": `dao-error-${name}` });
  const min = localInputValue(new Date(Date.now() + 2 * MIN_AHEAD_MS));
  return html`<section class="dao-page dao-new" aria-labelledby="dao-new-title">
    <p><a class="dao-back" href="#/dao">← All proposals</a></p>
    <h2 id="dao-new-title" tabindex="-1" ref=${heading}>New proposal</h2>
    <p class="dao-hint">Members vote Yes, No or Abstain until the deadline; it passes when Yes votes outnumber No votes.</p>
    <form id="dao-new-form" novalidate onSubmit=${submitProposal}>
      <label>Title <input ...${field("title")} maxlength="200" required autocomplete="off" /></label>
      <p class="error" id="dao-error-title">${f.errors.title ?? ""}</p>
      <label>Description <textarea ...${field("description")} rows="6" maxlength="5000" required></textarea></label>
      <p class="error" id="dao-error-description">${f.errors.description ?? ""}</p>
      <label>Deadline (your local time) <input ...${field("deadline")} type="datetime-local" required min=${min}
        defaultValue=${f.defaultDeadline} /></label>
      <p class="error" id="dao-error-deadline">${f.errors.deadline ?? ""}</p>
      <p class="error" role="alert">${f.error}</p>
      <div class="dao-actions">
        <button type="submit" class="dao-primary" disabled=${f.busy}>${f.busy ? "Opening…" : "Open the proposal"}</button>
        <a class="dao-button" href="#/dao">Cancel</a>
      </div>
    </form>
  </section>`;
}

function DaoView() {
  if (state.view === "new") return html`<${NewProposal} />`;
  if (state.view === "proposal") return html`<${ProposalPage} />`;
  return html`<${ProposalList} />`;
}

// --- the view contract ------------------------------------------------------------------------

/** List the proposals and follow the open ones' tallies. */
export async function start(ctx) {
  context = ctx;
  root = document.getElementById("dao-root");
  markReady();
  draw();
  await Promise.all([state.loaded ? null : reloadList(), myAddress().catch(() => null)]);
}

/** #/dao (the list), #/dao/new (the form) or #/dao/<id> (a proposal). */
export async function route(path) {
  await ready;
  const [first] = path.split("/");
  if (first === "new") {
    if (state.view !== "new") state.form = { errors: {}, error: "", busy: false,
      defaultDeadline: localInputValue(new Date(Date.now() + DEFAULT_AHEAD_MS)) };
    state.view = "new";
    draw();
    return;
  }
  if (/^\d+$/.test(first ?? "")) {
    state.view = "proposal";
    await openProposal(Number(first));
    return;
  }
  state.view = "list";
  state.detail.id = null;
  if (state.address === null) state.address = undefined; // a wallet made meanwhile (Purchases) is read again
  draw();
  await reloadList(); // a proposal opened elsewhere meanwhile shows up
}
