// The Assistant view (#/assistant, #/assistant/<conversation id>, #/assistant/new): a chat as people
// know it from ChatGPT or Open WebUI. Answers stream in as markdown (rendered by marked, then
// sanitized by DOMPurify), survive a reload or a gap in the stream (resume_stream with the answer's
// seq), and can be copied, regenerated and rated; a question can be edited into a new branch, and
// the branches of a message are switched with "‹ 2/3 ›". Conversations are listed, searched,
// renamed, deleted, exported and shared; the day's token usage shows under the composer.
import { html, render, useEffect, useLayoutEffect, useMemo, useRef } from "../vendor/preact-htm.module.js";
import { Marked } from "../vendor/marked.esm.js";
import createDOMPurify from "../vendor/purify.es.js";
import { datapodHref } from "../ui.js";

const NS = "/assistant";
// Kept for this tab only, so a bare #/assistant reopens the last conversation; app.js clears
// "hub.view." keys at sign-out.
const CONVERSATION_KEY = "hub.view.conversation";
const SYSTEM_PROMPT_MAX = 2000; // AI_SYSTEM_PROMPT_MAX_CHARS's default; the server says when its bound is lower
const TITLE_MAX = 200;
const FEEDBACK_MAX = 1000;
const LIST_PAGE = 50;
const SEARCH_DELAY_MS = 250;
const FINAL = new Set(["complete", "stopped", "failed", "interrupted"]);
const SUGGESTIONS = ["Which DataPods are the cheapest?", "Compare the two best rated DataPods", "What did I buy?",
  "Which categories are there?"];

let hub = null;
let api = null;
let datapodCard = null;
let me = null;
let root = null;
let markReady;
const ready = new Promise((resolve) => { markReady = resolve; });

const state = {
  conversations: [], nextBefore: null, listLoaded: false, listOpen: false, actionsOpen: false,
  search: { q: "", results: null, nextCursor: null, busy: false },
  conversation: null, // the open conversation; null: a new one, created by its first message
  messages: [], // the open conversation's current branch, oldest first
  byId: new Map(), // message id -> the message shown (the branch's objects)
  streamingId: null, // the answer being written in the open conversation
  loading: false, sending: false,
  draftText: "", draftSettings: { model: "", system_prompt: "" },
  editing: null, // the user message being edited
  feedback: new Map(), // answer id -> {rating, comment, commenting, thanked}
  copied: null, highlight: null,
  usage: null, models: null,
  error: "", notice: "",
  dialog: null, // {kind: "rename" | "delete" | "share", conversation, ...}
  announcement: "",
};
// Stream bookkeeping: the last seq shown per answer, and the resume running per answer.
const assistant = { applied: new Map(), resuming: new Map() };
let subscribedId = null; // the conversation whose channel this page follows
let openToken = 0; // the latest openConversation wins

// --- markdown, rendered safely ----------------------------------------------------------------

const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
// Raw HTML in an answer shows as text (as in ChatGPT), except a few plain tags without attributes:
// even parsing an `onerror` attribute for the sanitizer makes Chromium report the page's CSP.
const PLAIN_TAG = /^<\/?(br|sub|sup|kbd|b|i|em|strong|u|s|del|mark|small)\s*\/?>$/i;
const markdown = new Marked({ gfm: true, breaks: true });
markdown.use({ renderer: {
  html: ({ text }) => (PLAIN_TAG.test(text.trim()) ? text : escapeHtml(text)),
  // Images would load from anywhere (and break the page's CSP): they show as links instead.
  image: ({ href, text }) => `<a href="${escapeHtml(href ?? "")}">${escapeHtml(text || href || "image")}</a>`,
} });

const purify = createDOMPurify(window); // an instance of our own: its hook does not reach other views
purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName !== "A" || !node.hasAttribute("href")) return;
  if (node.getAttribute("href").startsWith("#")) node.removeAttribute("target"); // the page's own addresses
  else {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
const SANITIZE = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "option", "iframe", "video", "audio",
    "source", "picture", "dialog", "template"],
  // Ids and names could clash with the page's own; inline styles break its CSP.
  FORBID_ATTR: ["style", "id", "name", "srcset", "autofocus", "tabindex"],
};

const UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
const TITLED_REF = new RegExp(`\\*\\*([^*\\n]+?)\\*\\*\\s*\\[datapod:(${UUID})\\]`, "g");
const BARE_REF = new RegExp(`\\[datapod:(${UUID})\\]`, "g");
const escapeLinkText = (text) => text.replace(/[[\]\\*_`]/g, "\\$&");

/** `**Title** [datapod:<id>]` and `[datapod:<id>]` as links to the DataPod's page. */
function linkDatapods(text, pods) {
  return text
    .replace(TITLED_REF, (_, title, id) => `[**${title}**](${datapodHref(id.toLowerCase())})`)
    .replace(BARE_REF, (_, id) => {
      const title = pods.find((pod) => pod.id === id.toLowerCase())?.title ?? "DataPod";
      return `[${escapeLinkText(title)}](${datapodHref(id.toLowerCase())})`;
    });
}

/** Markdown to HTML that is safe to insert: rendered first, then sanitized. */
export function renderMarkdown(text, pods = []) {
  return purify.sanitize(markdown.parse(linkDatapods(text ?? "", pods)), SANITIZE);
}

function plainText(htmlText) {
  const template = document.createElement("template");
  template.innerHTML = htmlText;
  return template.content.textContent.replace(/\s+/g, " ").trim();
}

const snippetHtml = (snippet) => purify.sanitize(snippet ?? "", { ALLOWED_TAGS: ["mark"], ALLOWED_ATTR: [] });

// --- drawing ---------------------------------------------------------------------------------

let frame = 0;
/** Draw on the next animation frame: a burst of deltas costs one render (and one markdown parse). */
function update() {
  if (frame || !root) return;
  const draw = () => {
    if (!frame) return;
    cancelAnimationFrame(frame);
    clearTimeout(fallback);
    frame = 0;
    render(html`<${View} />`, root);
  };
  frame = requestAnimationFrame(draw);
  const fallback = setTimeout(draw, 250); // a tab in the background gets no animation frames
}

let announceTimer = null;
function announce(text) {
  // The same text twice would not be read again: clear first, then say it a moment later.
  clearTimeout(announceTimer);
  state.announcement = "";
  update();
  announceTimer = setTimeout(() => {
    state.announcement = text;
    update();
  }, 150);
}

function describe(error) {
  if (error?.code === "rate_limited" && error.retryAfter) {
    return `${error.message} Try again in ${Math.ceil(error.retryAfter)} s.`;
  }
  if (error?.code === "timeout" || error?.message === "operation has timed out") return "The hub did not answer in time. Try again.";
  return error?.message ?? String(error);
}

/** Run a user's action: its error shows in the alert; the alert clears at the next success. */
async function act(task) {
  try {
    const result = await task();
    state.error = "";
    return result;
  } catch (error) {
    state.error = describe(error);
    return undefined;
  } finally {
    update();
  }
}

const call = (command, payload = {}) => hub.call(NS, command, payload);

// --- messages and their streams ----------------------------------------------------------------

/**
 * The DataPods a tool result names, for cards: a marketplace DataPod (`id`, `title`, `price_sui`) or
 * an intent's row about one (`datapod_id`, `title`), however deep (compare nests them).
 */
function collectPods(result, pods = []) {
  if (Array.isArray(result)) for (const item of result) collectPods(item, pods);
  else if (result && typeof result === "object") {
    const id = typeof result.datapod_id === "string" ? result.datapod_id
      : typeof result.id === "string" && "price_sui" in result ? result.id : null;
    if (id && typeof result.title === "string") {
      if (!pods.some((pod) => pod.id === id)) pods.push({ ...result, id });
    } else {
      for (const [key, value] of Object.entries(result)) if (key !== "schema" && key !== "sample_rows") collectPods(value, pods);
    }
  }
  return pods;
}

function podsOf(message) {
  const pods = [];
  for (const toolCall of message.tool_calls ?? []) {
    let result = toolCall.result;
    if (typeof result === "string") {
      try { result = JSON.parse(result); } catch { result = null; } // cut at the stored size: no cards
    }
    collectPods(result, pods);
  }
  return pods;
}

function addPods(messageId, result) {
  const message = state.byId.get(messageId);
  if (!message) return;
  const pods = collectPods(result, [...message.pods]);
  if (pods.length !== message.pods.length) message.pods = pods;
  update();
}

function shown(message) {
  return { ...message, pods: message.pods ?? podsOf(message) };
}

/**
 * Put a new message in the branch after its parent: whatever followed the parent is replaced (an
 * edit, a regenerated answer), and the new message's versions are the replaced one's plus itself.
 * False when the parent is not in the branch shown (the caller re-reads the branch).
 */
function place(message) {
  if (state.byId.has(message.id)) return true;
  const parentIndex = message.parent_id ? state.messages.findIndex((m) => m.id === message.parent_id) : -1;
  if (message.parent_id && parentIndex < 0) return false;
  const replaced = state.messages[parentIndex + 1];
  const placed = shown({ ...message, sibling_ids: replaced ? [...(replaced.sibling_ids ?? [replaced.id]), message.id] : [message.id] });
  for (const gone of state.messages.slice(parentIndex + 1)) state.byId.delete(gone.id);
  state.messages = [...state.messages.slice(0, parentIndex + 1), placed];
  state.byId.set(placed.id, placed);
  if (placed.status === "streaming") state.streamingId = placed.id;
  update();
  return true;
}

/** The answer a delta is for; one not shown yet (its start was missed) is added, and the branch re-read. */
function answer(messageId) {
  let message = state.byId.get(messageId);
  if (!message) {
    message = shown({ id: messageId, role: "assistant", content: "", status: "streaming", created_at: new Date().toISOString(),
      sibling_ids: [messageId] });
    state.messages = [...state.messages, message];
    state.byId.set(messageId, message);
    refreshBranch();
  }
  return message;
}

function appendDelta(data) {
  const applied = assistant.applied.get(data.message_id) ?? 0;
  if (data.seq <= applied) return; // already shown (live and resumed copies overlap)
  if (data.seq > applied + 1) { catchUp(data.message_id).catch(() => {}); return; }
  assistant.applied.set(data.message_id, data.seq);
  answer(data.message_id).content += data.text;
  update();
}

async function resume(messageId, afterSeq) {
  const data = await call("resume_stream", { message_id: messageId, after_seq: afterSeq });
  if (!state.byId.has(messageId)) return; // another conversation opened meanwhile
  if (data.reset) {
    answer(messageId).content = data.content ?? "";
    assistant.applied.set(messageId, data.content_seq ?? data.seq);
  }
  for (const delta of data.deltas) appendDelta({ message_id: messageId, ...delta });
  if (data.error && state.byId.has(messageId)) state.byId.get(messageId).error = data.error;
  finish(messageId, data.status);
}

/** Fetch what is missing of an answer: one resume at a time, again if more went missing meanwhile. */
function catchUp(messageId) {
  const running = assistant.resuming.get(messageId);
  if (running) {
    running.again = true; // every delta of a gap would otherwise send its own resume_stream
    return running.promise;
  }
  const entry = { again: false };
  entry.promise = (async () => {
    try {
      do {
        entry.again = false;
        await resume(messageId, assistant.applied.get(messageId) ?? 0);
      } while (entry.again);
    } finally {
      assistant.resuming.delete(messageId);
    }
  })();
  assistant.resuming.set(messageId, entry);
  return entry.promise;
}

/** An answer's status; the end of one followed live is read out (the whole answer, once). */
function finish(messageId, status) {
  const message = state.byId.get(messageId);
  if (message) {
    const was = message.status;
    message.status = status;
    if (was === "streaming" && FINAL.has(status)) {
      const text = plainText(renderMarkdown(message.content, message.pods));
      const ending = status === "complete" ? "" : ` (${status})`;
      announce(`Assistant${ending}: ${text || "no text."}`);
    }
  }
  if (status === "streaming") state.streamingId = messageId;
  else if (state.streamingId === messageId) state.streamingId = null;
  update();
}

function onConversationEvent(event) {
  const data = event.data ?? {};
  switch (event.type) {
    case "message_started": {
      if (state.byId.has(data.message_id)) {
        finish(data.message_id, "streaming");
        break;
      }
      const placed = (!data.user_message || place(data.user_message)) && place({
        id: data.message_id, conversation_id: data.conversation_id, parent_id: data.parent_id, role: "assistant",
        content: "", status: "streaming", model: data.model, seq: 0, created_at: new Date().toISOString() });
      if (!placed) refreshBranch();
      break;
    }
    case "message_delta":
      appendDelta(data);
      break;
    case "tool_returned":
      addPods(data.message_id, data.result);
      break;
    case "message_completed":
    case "message_failed": {
      const message = state.byId.get(data.message_id);
      if (message) {
        if (data.usage) message.usage = data.usage;
        if (event.type === "message_failed") message.error = { code: data.code, message: data.message, retryable: data.retryable };
        if (data.usage?.total_tokens && state.conversation) {
          state.conversation.total_tokens = (state.conversation.total_tokens ?? 0) + data.usage.total_tokens;
        }
      }
      // Not complete in the page until every delta up to the final seq is shown.
      if ((data.seq ?? 0) > (assistant.applied.get(data.message_id) ?? 0)) catchUp(data.message_id).catch(() => {});
      else finish(data.message_id, data.status);
      break;
    }
    case "conversation_titled":
      retitle(data.conversation_id, data.title);
      break;
    default:
  }
}

/**
 * Show a branch read from the server. An answer this page has followed further than the server's
 * copy (its saved text trails the stream) keeps the text shown; the rest is the server's.
 */
function loadBranch(data) {
  state.conversation = data.conversation;
  const byId = new Map();
  state.messages = data.messages.map((message) => {
    const known = state.byId.get(message.id);
    const next = shown({ ...message, pods: known?.pods?.length ? known.pods : undefined });
    if (known && (assistant.applied.get(message.id) ?? 0) > (message.seq ?? 0)) {
      next.content = known.content;
      next.status = known.status;
    } else {
      assistant.applied.set(message.id, message.seq ?? 0);
    }
    byId.set(next.id, next);
    return next;
  });
  state.byId = byId;
  // The caller's ratings of the branch's answers, as the server has them.
  const rated = new Map((data.feedback ?? []).map((f) => [f.message_id, f]));
  for (const message of state.messages) {
    if (message.role !== "assistant") continue;
    const saved = rated.get(message.id);
    const shownFeedback = state.feedback.get(message.id);
    if (!saved) state.feedback.delete(message.id);
    else if (shownFeedback?.rating !== saved.rating) {
      state.feedback.set(message.id, { rating: saved.rating, comment: saved.comment ?? "", commenting: false, thanked: false });
    }
  }
  state.streamingId = state.messages.find((m) => m.status === "streaming")?.id ?? null;
  upsertConversation(data.conversation);
  update();
  // An answer still being written: fetch what was missed, then follow it live.
  return Promise.all(state.messages.filter((m) => m.status === "streaming").map((m) => catchUp(m.id).catch(() => {})));
}

async function refreshBranch() {
  const id = state.conversation?.id;
  if (!id) return;
  try {
    const data = await call("get_conversation", { conversation_id: id });
    if (state.conversation?.id === id) await loadBranch(data);
  } catch { /* the next event or action shows what went wrong */ }
}

async function follow(conversationId) {
  if (subscribedId === conversationId) return;
  const previous = subscribedId;
  subscribedId = conversationId;
  if (previous) hub.unsubscribe(NS, `conversation:${previous}`).catch(() => {});
  await hub.subscribe(NS, `conversation:${conversationId}`, {
    onEvent: (event) => { if (subscribedId === conversationId) onConversationEvent(event); },
    onGap: () => { if (subscribedId === conversationId) refreshBranch(); },
  });
}

function unfollow() {
  if (subscribedId) hub.unsubscribe(NS, `conversation:${subscribedId}`).catch(() => {});
  subscribedId = null;
}

// --- conversations -----------------------------------------------------------------------------

function remember(conversationId) {
  sessionStorage.setItem(CONVERSATION_KEY, conversationId);
  const address = `#/assistant/${conversationId}`;
  if (location.hash !== address && location.hash.startsWith("#/assistant")) history.replaceState(history.state, "", address);
}

async function openConversation(conversationId, { scrollTo = null } = {}) {
  const token = ++openToken;
  if (state.conversation?.id === conversationId && subscribedId === conversationId) {
    if (scrollTo) reveal(scrollTo);
    return;
  }
  state.loading = true;
  state.editing = null;
  state.notice = "";
  update();
  try {
    const data = await call("get_conversation", { conversation_id: conversationId });
    if (token !== openToken) return;
    await follow(conversationId);
    if (token !== openToken) return;
    state.byId = new Map();
    remember(conversationId);
    stick.bottom = true;
    await loadBranch(data);
    state.error = "";
    if (scrollTo) reveal(scrollTo);
  } catch (error) {
    if (token !== openToken) return;
    if (!["not_found", "forbidden", "invalid_payload"].includes(error.code)) {
      state.error = `The conversation could not be opened: ${describe(error)}`; // kept: a reload tries again
      return;
    }
    showNew(); // gone (deleted, another account's, a mistyped address): forget it
    state.error = "That conversation does not exist, or is not yours.";
  } finally {
    if (token === openToken) state.loading = false;
    update();
  }
}

/** A new conversation: nothing is created until its first message is sent. */
function showNew() {
  openToken++;
  unfollow();
  sessionStorage.removeItem(CONVERSATION_KEY);
  Object.assign(state, { conversation: null, messages: [], byId: new Map(), streamingId: null, editing: null, loading: false });
  update();
}

function upsertConversation(conversation) {
  const list = state.conversations.filter((c) => c.id !== conversation.id);
  list.push(conversation);
  list.sort((a, b) => (b.updated_at ?? "").localeCompare(a.updated_at ?? ""));
  state.conversations = list;
}

function retitle(conversationId, title) {
  for (const conversation of [state.conversation, ...state.conversations]) {
    if (conversation?.id === conversationId) conversation.title = title;
  }
  update();
}

function forget(conversationId) {
  state.conversations = state.conversations.filter((c) => c.id !== conversationId);
  if (state.search.results) state.search.results = state.search.results.filter((r) => r.conversation.id !== conversationId);
  if (state.conversation?.id === conversationId) {
    showNew();
    if (location.hash.startsWith("#/assistant")) history.replaceState(history.state, "", "#/assistant/new");
  }
  update();
}

async function loadConversations({ more = false } = {}) {
  const payload = { limit: LIST_PAGE };
  if (more && state.nextBefore) payload.before = state.nextBefore;
  const data = await call("list_conversations", payload);
  const known = more ? state.conversations : [];
  state.conversations = [...known, ...data.conversations.filter((c) => !known.some((k) => k.id === c.id))];
  state.nextBefore = data.next_before;
  state.listLoaded = true;
  update();
}

async function loadUsage() {
  state.usage = await api("GET", "/api/v1/me/usage");
  update();
}

function onUserEvent(event) {
  const data = event.data ?? {};
  if (event.type === "conversation_created" && data.conversation) {
    if (!state.conversations.some((c) => c.id === data.conversation.id)) upsertConversation(data.conversation);
    update();
  } else if (event.type === "conversation_deleted") {
    if (state.conversation?.id === data.conversation_id) state.notice = "This conversation was deleted.";
    forget(data.conversation_id);
  } else if (event.type === "conversation_titled") {
    retitle(data.conversation_id, data.title);
  } else if (event.type === "usage_changed") {
    state.usage = { ...state.usage, ...data };
    update();
  }
}

async function runSearch({ more = false } = {}) {
  const q = state.search.q.trim();
  if (!q) {
    state.search = { q: state.search.q, results: null, nextCursor: null, busy: false };
    update();
    return;
  }
  state.search.busy = true;
  update();
  await act(async () => {
    const payload = { q, limit: 20 };
    if (more && state.search.nextCursor) payload.cursor = state.search.nextCursor;
    const data = await call("search_conversations", payload);
    if (state.search.q.trim() !== q) return; // typed on meanwhile: that search is newer
    state.search.results = more ? [...state.search.results, ...data.results] : data.results;
    state.search.nextCursor = data.next_cursor;
  });
  state.search.busy = false;
  update();
}

let searchTimer = null;
function onSearchInput(event) {
  state.search.q = event.currentTarget.value;
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => runSearch(), SEARCH_DELAY_MS);
  update();
}

/** A search hit: its conversation, on the branch of the matching message. */
async function openHit(event, hit) {
  event.preventDefault();
  state.listOpen = false;
  await act(async () => {
    const conversationId = hit.conversation.id;
    if (hit.message_id) {
      const data = await call("switch_branch", { message_id: hit.message_id });
      if (state.conversation?.id === conversationId && subscribedId === conversationId) {
        await loadBranch(data);
        reveal(hit.message_id);
        return;
      }
    }
    const address = `#/assistant/${conversationId}`;
    pendingReveal = hit.message_id;
    if (location.hash === address) await route(conversationId);
    else location.hash = address;
  });
}

let pendingReveal = null;
const stick = { bottom: true };

function reveal(messageId) {
  state.highlight = messageId;
  stick.bottom = false;
  update();
  setTimeout(() => {
    if (state.highlight === messageId) state.highlight = null;
    update();
  }, 4000);
  requestAnimationFrame(() => requestAnimationFrame(() => {
    document.getElementById(`m-${messageId}`)?.scrollIntoView({ block: "center" });
  }));
}

// --- actions -----------------------------------------------------------------------------------

function newConversationSettings() {
  const settings = {};
  if (state.draftSettings.model) settings.model = state.draftSettings.model;
  if (state.draftSettings.system_prompt.trim()) settings.system_prompt = state.draftSettings.system_prompt.trim();
  return settings;
}

async function send(text = state.draftText) {
  const content = text.trim();
  if (!content || state.streamingId || state.sending || state.loading) return;
  state.sending = true;
  state.draftText = "";
  stick.bottom = true;
  update();
  const ok = await act(async () => {
    if (!state.conversation) {
      const created = await call("create_conversation", newConversationSettings());
      state.draftSettings = { model: "", system_prompt: "" };
      state.byId = new Map();
      state.messages = [];
      state.conversation = created.conversation;
      upsertConversation(created.conversation);
      await follow(created.conversation.id);
      remember(created.conversation.id);
    }
    const conversation = state.conversation;
    const ack = await call("send_message", {
      conversation_id: conversation.id, content, client_msg_id: crypto.randomUUID() });
    if (state.conversation?.id !== conversation.id) return true;
    if (!(place(ack.user_message) && place(ack.assistant_message))) refreshBranch();
    conversation.updated_at = new Date().toISOString();
    upsertConversation(conversation);
    return true;
  });
  state.sending = false;
  if (!ok && !state.draftText) state.draftText = content; // refused: the text is not lost
  update();
}

async function stop() {
  const messageId = state.streamingId;
  if (messageId) await act(() => call("stop_generation", { message_id: messageId }));
}

async function regenerate(message) {
  stick.bottom = true;
  await act(async () => {
    const ack = await call("regenerate", { message_id: message.id });
    if (!place(ack.assistant_message)) refreshBranch();
  });
}

async function saveEdit(event, message) {
  event.preventDefault();
  const content = event.currentTarget.content.value.trim();
  if (!content) return;
  if (content === message.content.trim()) {
    state.editing = null;
    update();
    return;
  }
  stick.bottom = true;
  await act(async () => {
    const ack = await call("edit_message", { message_id: message.id, content, client_msg_id: crypto.randomUUID() });
    state.editing = null;
    if (!(place(ack.user_message) && place(ack.assistant_message))) refreshBranch();
  });
}

async function switchTo(messageId) {
  await act(async () => loadBranch(await call("switch_branch", { message_id: messageId })));
}

async function copy(message) {
  try {
    await navigator.clipboard.writeText(message.content);
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: message.content });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  state.copied = message.id;
  announce("Copied to the clipboard.");
  setTimeout(() => {
    if (state.copied === message.id) state.copied = null;
    update();
  }, 2000);
}

async function rate(message, rating) {
  const current = state.feedback.get(message.id);
  await act(async () => {
    if (current?.rating === rating) {
      await call("withdraw_feedback", { message_id: message.id });
      state.feedback.delete(message.id);
    } else {
      await call("give_feedback", { message_id: message.id, rating });
      state.feedback.set(message.id, { rating, comment: "", commenting: true, thanked: false });
    }
  });
}

async function sendComment(event, message) {
  event.preventDefault();
  const feedback = state.feedback.get(message.id);
  const comment = event.currentTarget.comment.value.trim();
  if (!feedback) return;
  await act(async () => {
    await call("give_feedback", { message_id: message.id, rating: feedback.rating, comment });
    Object.assign(feedback, { comment, commenting: false, thanked: true });
  });
}

function saveFile(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const anchor = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function exportConversation(format) {
  const conversation = state.conversation;
  if (!conversation) return;
  state.actionsOpen = false;
  await act(async () => {
    const data = await call("export_conversation", { conversation_id: conversation.id, format });
    saveFile(data.filename, data.content, data.content_type);
    announce(`Downloaded ${data.filename}.`);
  });
}

async function saveSettings(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const model = form.model?.value ?? "";
  const systemPrompt = form.system_prompt.value;
  if (!state.conversation) {
    state.draftSettings = { model, system_prompt: systemPrompt };
    state.settingsSaved = "Saved: the new conversation starts with these settings.";
    update();
    return;
  }
  const conversation = state.conversation;
  await act(async () => {
    const changes = { conversation_id: conversation.id, system_prompt: systemPrompt.trim() || null };
    if (form.model) changes.model = model || null;
    const data = await call("update_conversation", changes);
    Object.assign(conversation, data.conversation);
    upsertConversation(conversation);
    state.settingsSaved = "Saved.";
  });
}

function openDialog(kind, extra = {}) {
  state.dialog = { kind, conversation: state.conversation, ...extra };
  state.actionsOpen = false;
  update();
}

function closeDialog() {
  state.dialog = null;
  update();
}

async function renameConversation(event) {
  event.preventDefault();
  const { conversation } = state.dialog;
  const title = event.currentTarget.title.value.trim();
  if (!title) return;
  await act(async () => {
    const data = await call("rename_conversation", { conversation_id: conversation.id, title });
    retitle(conversation.id, data.conversation.title);
    closeDialog();
  });
}

async function deleteConversation() {
  const { conversation } = state.dialog;
  await act(async () => {
    await call("delete_conversation", { conversation_id: conversation.id });
    closeDialog();
    forget(conversation.id);
    announce(`Deleted “${conversation.title ?? "Untitled"}”.`);
  });
}

async function share() {
  const dialog = state.dialog;
  await act(async () => {
    const data = await call("share_conversation", { conversation_id: dialog.conversation.id });
    dialog.link = data.share.token ? new URL(data.share.path, location.origin).href : null;
    dialog.status = data.share.token ? "Anyone with this link can read the conversation (its current branch)."
      : "This conversation is shared already. Its link was shown once, when it was made: revoke it to make a new one.";
    dialog.shared = true;
  });
}

async function unshare() {
  const dialog = state.dialog;
  await act(async () => {
    await call("unshare_conversation", { conversation_id: dialog.conversation.id });
    Object.assign(dialog, { link: null, shared: false, status: "Link revoked: it no longer opens the conversation." });
  });
}

function onComposerKey(event) {
  if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.altKey || event.ctrlKey || event.metaKey) return;
  // On a touch keyboard Enter is the only way to a new line; there the Send button sends.
  if (matchMedia("(pointer: coarse)").matches) return;
  event.preventDefault();
  send(event.currentTarget.value);
}

function onComposerInput(event) {
  state.draftText = event.currentTarget.value;
  grow(event.currentTarget);
  update();
}

function grow(area) {
  area.style.height = "auto";
  area.style.height = `${Math.min(area.scrollHeight + 2, 240)}px`;
}

// --- the view ----------------------------------------------------------------------------------

function timeText(iso) {
  if (!iso) return null;
  const date = new Date(iso);
  const today = date.toDateString() === new Date().toDateString();
  const text = today ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  return html`<time datetime=${iso} title=${date.toLocaleString()}>${text}</time>`;
}

const numberText = (n) => Number(n ?? 0).toLocaleString();

function durationText(seconds) {
  const total = Math.ceil(seconds / 60);
  const hours = Math.floor(total / 60);
  return hours ? `${hours} h ${total % 60} min` : `${total} min`;
}

function MarkdownText({ text, pods }) {
  const ref = useRef(null);
  const rendered = useMemo(() => renderMarkdown(text, pods), [text, pods]);
  useLayoutEffect(() => { if (ref.current) ref.current.markdownSource = text; }, [text]);
  return html`<div class="text markdown" ref=${ref} dangerouslySetInnerHTML=${{ __html: rendered }}></div>`;
}

function Cards({ pods }) {
  const ref = useRef(null);
  useLayoutEffect(() => {
    const list = ref.current;
    const have = new Set([...list.children].map((item) => item.dataset.key));
    for (const pod of pods) {
      if (have.has(pod.id)) continue;
      const card = datapodCard(pod);
      card.dataset.key = pod.id;
      list.append(card);
    }
  }, [pods]);
  const count = pods.length;
  return html`<details class="pods">
    <summary>${count} DataPod${count === 1 ? "" : "s"} in this answer</summary>
    <ul class="cards" ref=${ref}></ul>
  </details>`;
}

function Branches({ message }) {
  const siblings = message.sibling_ids ?? [];
  if (siblings.length < 2) return null;
  const index = siblings.indexOf(message.id);
  const busy = Boolean(state.streamingId);
  return html`<span class="branches" role="group" aria-label="Versions of this message">
    <button type="button" class="icon" aria-label="Previous version" disabled=${index <= 0 || busy}
      onClick=${() => switchTo(siblings[index - 1])}>‹</button>
    <span class="branch-position">${index + 1}/${siblings.length}</span>
    <button type="button" class="icon" aria-label="Next version" disabled=${index >= siblings.length - 1 || busy}
      onClick=${() => switchTo(siblings[index + 1])}>›</button>
  </span>`;
}

function EditForm({ message }) {
  const ref = useRef(null);
  useEffect(() => {
    const area = ref.current;
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
    grow(area);
  }, []);
  const cancel = () => { state.editing = null; update(); };
  const onKey = (event) => {
    if (event.key === "Escape") cancel();
    else if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !matchMedia("(pointer: coarse)").matches) {
      event.preventDefault();
      event.currentTarget.form.requestSubmit();
    }
  };
  return html`<form class="edit" onSubmit=${(event) => saveEdit(event, message)}>
    <label for=${`edit-${message.id}`} class="visually-hidden">Edit your message</label>
    <textarea id=${`edit-${message.id}`} name="content" ref=${ref} rows="2" required onKeyDown=${onKey}
      defaultValue=${message.content} onInput=${(event) => grow(event.currentTarget)}></textarea>
    <div class="actions">
      <button type="submit" class="primary">Save and send</button>
      <button type="button" onClick=${cancel}>Cancel</button>
    </div>
    <p class="hint">Sending the edit starts a new branch; the earlier version stays, with its answer (‹ ›).</p>
  </form>`;
}

const THUMB = "M2 10h4v11H2zM8 21h9.2a2 2 0 0 0 2-1.6l1.6-7A2 2 0 0 0 18.8 10H14l.8-4.2A2 2 0 0 0 12.9 3.5L8 10z";
const thumb = (down) => html`<svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true" focusable="false"
  class=${down ? "thumb down" : "thumb"}><path d=${THUMB} /></svg>`;

function Feedback({ message }) {
  const feedback = state.feedback.get(message.id);
  const pressed = (rating) => String(feedback?.rating === rating);
  return html`
    <button type="button" class="icon" aria-label="Good answer" title="Good answer" aria-pressed=${pressed("up")}
      onClick=${() => rate(message, "up")}>${thumb(false)}</button>
    <button type="button" class="icon" aria-label="Bad answer" title="Bad answer" aria-pressed=${pressed("down")}
      onClick=${() => rate(message, "down")}>${thumb(true)}</button>`;
}

function FeedbackComment({ message }) {
  const feedback = state.feedback.get(message.id);
  if (!feedback) return null;
  if (feedback.thanked) return html`<p class="hint" role="status">Thanks for the feedback.</p>`;
  if (!feedback.commenting) return null;
  const close = () => { feedback.commenting = false; update(); };
  return html`<form class="comment" onSubmit=${(event) => sendComment(event, message)}>
    <label>${feedback.rating === "up" ? "What was good? (optional)" : "What was wrong? (optional)"}
      <textarea name="comment" rows="2" maxlength=${FEEDBACK_MAX}></textarea></label>
    <div class="actions"><button type="submit">Send comment</button><button type="button" onClick=${close}>No comment</button></div>
  </form>`;
}

function failureText(message) {
  const error = message.error ?? {};
  if (message.status === "interrupted") return "The answer was interrupted (the server stopped while writing it).";
  return error.message ? `The answer failed: ${error.message}` : "The answer failed.";
}

function Message({ message }) {
  const user = message.role === "user";
  const streaming = message.status === "streaming";
  const busy = Boolean(state.streamingId);
  const failed = message.status === "failed" || message.status === "interrupted";
  const who = `m-${message.id}-who`;
  const modelShown = !user && state.models?.mode === "model" && message.model;
  return html`<article id=${`m-${message.id}`} class=${`message ${message.role}${state.highlight === message.id ? " found" : ""}`}
      data-status=${message.status ?? ""} aria-labelledby=${who} aria-busy=${streaming ? "true" : "false"}>
    <div class="meta">
      <span class="speaker" id=${who}>${user ? "You" : "Assistant"}</span>
      ${modelShown ? html`<span class="model">${message.model}</span>` : null}
      ${timeText(message.created_at)}
      ${message.status === "stopped" ? html`<span class="badge">Stopped</span>` : null}
    </div>
    ${state.editing === message.id ? html`<${EditForm} message=${message} />`
      : user ? html`<div class="text plain">${message.content}</div>`
        : html`<${MarkdownText} text=${message.content} pods=${message.pods} />`}
    ${streaming && !message.content ? html`<p class="typing">Thinking…</p>` : null}
    ${failed ? html`<p class="failure">${failureText(message)}</p>` : null}
    ${!user && message.pods.length ? html`<${Cards} pods=${message.pods} />` : null}
    ${state.editing === message.id ? null : html`<div class="message-actions">
      <${Branches} message=${message} />
      ${streaming ? null : html`<button type="button" class="small" onClick=${() => copy(message)}
          aria-label=${user ? "Copy message" : "Copy answer"}>${state.copied === message.id ? "Copied" : "Copy"}</button>`}
      ${user ? html`<button type="button" class="small" disabled=${busy} onClick=${() => { state.editing = message.id; update(); }}>Edit</button>` : null}
      ${!user && !streaming ? html`<button type="button" class="small" disabled=${busy} onClick=${() => regenerate(message)}>${failed ? "Retry" : "Regenerate"}</button>
        <${Feedback} message=${message} />` : null}
    </div>`}
    ${!user ? html`<${FeedbackComment} message=${message} />` : null}
  </article>`;
}

function Messages() {
  const ref = useRef(null);
  const grown = useRef("");
  // Follow the end of the conversation while it grows (a new message, a delta), if the reader is
  // there: a render that adds nothing (a label, a toggle) leaves the scroll where the reader put it.
  const last = state.messages.at(-1);
  const size = `${state.conversation?.id}:${state.messages.length}:${last?.id}:${last?.content.length}:${last?.status}`;
  useLayoutEffect(() => {
    if (grown.current === size) return;
    grown.current = size;
    if (stick.bottom && ref.current) ref.current.scrollTop = ref.current.scrollHeight;
  });
  const onScroll = (event) => {
    const box = event.currentTarget;
    stick.bottom = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  };
  const empty = !state.messages.length;
  return html`<div id="messages" ref=${ref} onScroll=${onScroll} tabindex="0" role="region" aria-label="Messages">
    ${state.loading && empty ? html`<p class="hint">Loading the conversation…</p>` : null}
    ${empty && !state.loading ? html`<div class="welcome empty">
      <p><strong>Ask about the marketplace's DataPods.</strong> Answers stream in as you watch; you can stop, copy,
        regenerate or rate them, and edit your question to try another branch.</p>
      <ul class="suggestions">${SUGGESTIONS.map((text) => html`<li><button type="button"
        onClick=${() => { state.draftText = text; update(); document.getElementById("chat-input")?.focus(); }}>${text}</button></li>`)}</ul>
    </div>` : null}
    ${state.messages.map((message) => html`<${Message} key=${message.id} message=${message} />`)}
  </div>`;
}

function Composer() {
  const ref = useRef(null);
  const streaming = Boolean(state.streamingId);
  const empty = !state.draftText.trim();
  useLayoutEffect(() => { if (ref.current && !state.draftText) ref.current.style.height = ""; });
  const retrieval = state.models?.mode === "retrieval_only";
  return html`<form id="chat-form" onSubmit=${(event) => { event.preventDefault(); send(event.currentTarget.content.value); }}>
    <label for="chat-input" class="visually-hidden">Message</label>
    <textarea id="chat-input" name="content" ref=${ref} rows="1" value=${state.draftText}
      placeholder="Ask about DataPods" aria-describedby="chat-help" onInput=${onComposerInput} onKeyDown=${onComposerKey}></textarea>
    <button type="submit" class="primary" disabled=${empty || state.sending || state.loading} hidden=${streaming}>Send</button>
    <button type="button" id="stop" hidden=${!streaming} onClick=${stop}>Stop</button>
  </form>
  <p id="chat-help" class="hint">Enter sends, Shift+Enter starts a new line.${retrieval
    ? " Retrieval-only: no AI model is configured, so answers come from searching the marketplace." : ""}</p>`;
}

function Usage() {
  const usage = state.usage;
  if (!usage) return null;
  const quota = usage.quota ?? {};
  return html`<p class="usage" id="assistant-usage">
    <span>Today: <strong data-tokens=${usage.today?.total_tokens ?? 0}>${numberText(usage.today?.total_tokens)}</strong> tokens</span>
    ${quota.daily_tokens ? html`<span> · <strong data-remaining=${quota.remaining_tokens}>${numberText(quota.remaining_tokens)}</strong>${" "}
      of ${numberText(quota.daily_tokens)} left</span>
      <meter min="0" max=${quota.daily_tokens} value=${quota.used_tokens} aria-label="Share of today's tokens used"></meter>` : null}
    ${usage.resets_in ? html`<span class="hint"> · resets in ${durationText(usage.resets_in)}</span>` : null}
  </p>`;
}

function Settings() {
  const conversation = state.conversation;
  const models = state.models;
  if (models?.mode !== "model") return null;
  const current = conversation ? conversation.model ?? "" : state.draftSettings.model;
  const prompt = conversation ? conversation.system_prompt ?? "" : state.draftSettings.system_prompt;
  const key = conversation?.id ?? "new";
  return html`<details class="settings" key=${key} onToggle=${() => { state.settingsSaved = ""; }}>
    <summary>Model and system prompt</summary>
    <form onSubmit=${saveSettings}>
      <label>Model
        <select name="model">
          <option value="" selected=${current === ""}>Default (${models.default})</option>
          ${models.models.filter((m) => m.id !== models.default || current === m.id).map((m) =>
            html`<option value=${m.id} selected=${current === m.id}>${m.id}</option>`)}
        </select></label>
      <label>System prompt (optional, at most ${SYSTEM_PROMPT_MAX} characters)
        <textarea name="system_prompt" rows="3" maxlength=${SYSTEM_PROMPT_MAX} defaultValue=${prompt}
          placeholder="For example: answer in French, briefly."></textarea></label>
      <button type="submit">Save settings</button>
      <span class="hint" role="status">${state.settingsSaved ?? ""}</span>
    </form>
  </details>`;
}

function ChatHeader() {
  const conversation = state.conversation;
  const title = conversation ? conversation.title ?? "Untitled" : "New conversation";
  return html`<div class="chat-head">
    <div class="chat-title">
      <h2 id="chat-title">${title}</h2>
      ${conversation?.total_tokens ? html`<span class="hint">${numberText(conversation.total_tokens)} tokens</span>` : null}
    </div>
    ${conversation ? html`
      <button type="button" class="small actions-toggle" aria-expanded=${String(state.actionsOpen)}
        aria-controls="conversation-actions" onClick=${() => { state.actionsOpen = !state.actionsOpen; update(); }}>Actions</button>
      <div id="conversation-actions" class=${`toolbar${state.actionsOpen ? " open" : ""}`} role="group" aria-label="Conversation">
        <button type="button" class="small" onClick=${() => openDialog("rename")}>Rename</button>
        <button type="button" class="small" onClick=${() => exportConversation("md")}>Export Markdown</button>
        <button type="button" class="small" onClick=${() => exportConversation("json")}>Export JSON</button>
        <button type="button" class="small" onClick=${() => openDialog("share")}>Share</button>
        <button type="button" class="small danger" onClick=${() => openDialog("delete")}>Delete</button>
      </div>` : null}
    <${Settings} />
  </div>`;
}

function ConversationList() {
  const search = state.search;
  const currentId = state.conversation?.id;
  const item = (conversation) => html`<li key=${conversation.id} data-key=${conversation.id}
      class=${conversation.id === currentId ? "current" : ""}>
    <a href=${`#/assistant/${conversation.id}`} aria-current=${conversation.id === currentId ? "page" : undefined}>
      <span class="title">${conversation.title ?? "Untitled"}</span>
      ${conversation.updated_at ? html`<small>${timeText(conversation.updated_at)}</small>` : null}
    </a>
  </li>`;
  if (search.results) {
    return html`<div class="results">
      <p class="hint" role="status">${search.results.length ? `${search.results.length}${search.nextCursor ? "+" : ""} conversation${search.results.length === 1 ? "" : "s"} found`
        : "No conversation matches. Try other words."}</p>
      <ul id="search-results" class="conversations">
        ${search.results.map((hit) => html`<li key=${hit.conversation.id} data-key=${hit.conversation.id}>
          <a href=${`#/assistant/${hit.conversation.id}`} onClick=${(event) => openHit(event, hit)}>
            <span class="title">${hit.conversation.title ?? "Untitled"}</span>
            <span class="snippet" dangerouslySetInnerHTML=${{ __html: snippetHtml(hit.snippet) }}></span>
          </a></li>`)}
      </ul>
      ${search.nextCursor ? html`<button type="button" onClick=${() => runSearch({ more: true })}>More results</button>` : null}
    </div>`;
  }
  return html`
    ${state.listLoaded && !state.conversations.length
      ? html`<p class="empty">No conversations yet. Ask something and it appears here.</p>` : null}
    <ul id="conversations" class="conversations">${state.conversations.map(item)}</ul>
    ${state.nextBefore ? html`<button type="button" onClick=${() => act(() => loadConversations({ more: true }))}>Load more</button>` : null}`;
}

function Sidebar() {
  const open = state.listOpen;
  const toggle = () => { state.listOpen = !open; update(); };
  const startNew = () => {
    state.listOpen = false;
    if (location.hash === "#/assistant/new") showNew();
    else location.hash = "#/assistant/new";
    requestAnimationFrame(() => document.getElementById("chat-input")?.focus());
  };
  return html`<aside class=${`conversation-pane${open ? " open" : ""}`} aria-label="Conversations">
    <div class="pane-head">
      <button type="button" class="list-toggle" aria-expanded=${String(open)} aria-controls="conversation-panel"
        onClick=${toggle}>Conversations (${state.conversations.length}${state.nextBefore ? "+" : ""})</button>
      <button type="button" id="new-conversation" class="primary" onClick=${startNew}>New conversation</button>
    </div>
    <div id="conversation-panel">
      <form role="search" class="conversation-search" onSubmit=${(event) => { event.preventDefault(); clearTimeout(searchTimer); runSearch(); }}>
        <label for="conversation-search-input">Search conversations</label>
        <input id="conversation-search-input" type="search" name="q" maxlength="200" value=${state.search.q}
          placeholder=${'Words, "a phrase", -excluded'} onInput=${onSearchInput} />
      </form>
      <${ConversationList} />
    </div>
  </aside>`;
}

function Modal({ kind, title, children }) {
  const ref = useRef(null);
  useEffect(() => {
    const dialog = ref.current;
    if (state.dialog?.kind === kind && !dialog.open) {
      dialog.returnValue = "";
      dialog.showModal();
    }
    if (state.dialog?.kind !== kind && dialog.open) dialog.close("closed"); // its close event comes later
  });
  // Closed by the user (Escape): forget the dialog. A close of our own is already forgotten, and its
  // late event must not close a dialog opened since.
  const onClose = (event) => {
    if (event.currentTarget.returnValue !== "closed" && state.dialog?.kind === kind) closeDialog();
  };
  return html`<dialog ref=${ref} id=${`assistant-${kind}-dialog`} aria-labelledby=${`assistant-${kind}-title`} onClose=${onClose}>
    <h2 id=${`assistant-${kind}-title`}>${title}</h2>
    ${state.dialog?.kind === kind ? children : null}
  </dialog>`;
}

function Dialogs() {
  const dialog = state.dialog;
  const name = dialog?.conversation?.title ?? "Untitled";
  return html`
    <${Modal} kind="rename" title="Rename the conversation">
      <form onSubmit=${renameConversation}>
        <label>Title <input name="title" required maxlength=${TITLE_MAX} defaultValue=${dialog?.conversation?.title ?? ""} /></label>
        <div class="actions"><button type="button" onClick=${closeDialog}>Cancel</button>
          <button type="submit" class="primary">Rename</button></div>
      </form>
    <//>
    <${Modal} kind="delete" title="Delete the conversation?">
      <p>“${name}” and all its messages, branches, share links and feedback are deleted. This cannot be undone.</p>
      <div class="actions"><button type="button" onClick=${closeDialog} autofocus>Cancel</button>
        <button type="button" class="danger" onClick=${deleteConversation}>Delete</button></div>
    <//>
    <${Modal} kind="share" title="Share a read-only link">
      <p>A link lets anyone read this conversation's current branch, without signing in: not your name, other branches
        or tool calls. Revoke it to stop it working.</p>
      ${dialog?.link ? html`<label>Link <input readonly value=${dialog.link} onFocus=${(event) => event.currentTarget.select()} /></label>`
        : null}
      <p class="hint" role="status">${dialog?.status ?? ""}</p>
      <div class="actions">
        ${dialog?.link ? html`<button type="button" onClick=${() => copy({ id: "share", content: dialog.link })}>
          ${state.copied === "share" ? "Copied" : "Copy link"}</button>` : html`<button type="button" class="primary" onClick=${share}>Create link</button>`}
        <button type="button" class="danger" onClick=${unshare}>Revoke link</button>
        <button type="button" onClick=${closeDialog}>Close</button>
      </div>
    <//>`;
}

function View() {
  return html`<div class="assistant-view">
    <${Sidebar} />
    <div class="chat">
      <${ChatHeader} />
      <p id="assistant-error" class="error" role="alert">${state.error}</p>
      ${state.notice ? html`<p class="notice" role="status">${state.notice}</p>` : null}
      <${Messages} />
      <${Composer} />
      <${Usage} />
      <div id="assistant-live" class="visually-hidden" aria-live="polite" aria-atomic="true">${state.announcement}</div>
    </div>
  </div>
  <${Dialogs} />`;
}

// --- the view contract ---------------------------------------------------------------------------

/** Draw the view, follow the user's conversations and usage; route() opens the conversation. */
export async function start(context) {
  ({ hub, api, datapodCard, me } = context);
  root = document.getElementById("tab-assistant");
  root.replaceChildren();
  render(html`<${View} />`, root);
  markReady();
  const quiet = (promise) => promise.catch((error) => { state.error = describe(error); update(); });
  await Promise.all([
    quiet(loadConversations()),
    quiet(loadUsage()),
    call("list_models").then((models) => { state.models = models; update(); }, () => {}),
    quiet(hub.subscribe(NS, `user:${me.id}`, {
      onEvent: onUserEvent,
      onGap: () => { loadConversations().catch(() => {}); loadUsage().catch(() => {}); },
    })),
  ]);
}

/** #/assistant/<id>: that conversation; #/assistant/new: a new one; #/assistant: the last one of this tab. */
export async function route(path) {
  await ready;
  state.listOpen = false;
  state.actionsOpen = false;
  const target = pendingReveal;
  pendingReveal = null;
  fitPhone();
  if (path === "new") return showNew();
  if (path === "") {
    const remembered = sessionStorage.getItem(CONVERSATION_KEY);
    if (!remembered) return showNew();
    history.replaceState(history.state, "", `#/assistant/${remembered}`);
    return openConversation(remembered);
  }
  return openConversation(path, { scrollTo: target });
}

/** On a phone the chat fills the screen: the page scrolls to it, its composer in sight. */
function fitPhone() {
  if (!matchMedia("(max-width: 700px)").matches) return;
  requestAnimationFrame(() => {
    if (!root.hidden) root.querySelector(".assistant-view")?.scrollIntoView({ block: "start" });
  });
}
