// The dashboard: sign-in, then one tab per namespace, all live through hub.js.
import { api, Hub, HubError, session } from "./hub.js";

const $ = (selector) => document.querySelector(selector);
const hub = new Hub({ onState: showConnectionState });
window.hub = hub; // a handle for the browser tests and for debugging from the console
let me = null;

function showConnectionState(state) {
  const badge = $("#connection");
  badge.dataset.state = state;
  badge.textContent = state;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== undefined && child !== null));
  return node;
}

function upsert(list, key, node, { prepend = true } = {}) {
  node.dataset.key = key;
  const existing = list.querySelector(`[data-key="${CSS.escape(key)}"]`);
  if (existing) existing.replaceWith(node);
  else if (prepend) list.prepend(node);
  else list.append(node);
  node.classList.add("new");
  return node;
}

// --- sign-in ------------------------------------------------------------------------------

async function signIn(path, form) {
  const body = Object.fromEntries(new FormData(form));
  try {
    const data = await api("POST", path, body);
    session.token = data.token;
    await start();
  } catch (error) {
    $("#sign-in-error").textContent = error instanceof HubError ? error.message : String(error);
  }
}

$("#login-form").addEventListener("submit", (event) => { event.preventDefault(); signIn("/api/v1/auth/login", event.target); });
$("#register-form").addEventListener("submit", (event) => { event.preventDefault(); signIn("/api/v1/auth/register", event.target); });
$("#sign-out").addEventListener("click", async () => {
  await api("POST", "/api/v1/auth/logout").catch(() => {});
  session.token = null;
  location.reload();
});

// --- tabs ---------------------------------------------------------------------------------

for (const button of document.querySelectorAll("nav button")) {
  button.addEventListener("click", () => {
    for (const other of document.querySelectorAll("nav button")) other.setAttribute("aria-selected", String(other === button));
    for (const tab of document.querySelectorAll(".tab")) tab.hidden = tab.id !== `tab-${button.dataset.tab}`;
  });
}

// --- marketplace --------------------------------------------------------------------------

function datapodCard(pod) {
  return element("li", { dataset: { datapodId: pod.id } },
    element("h4", {}, pod.title ?? pod.id),
    element("p", {}, pod.description ?? ""),
    element("p", { class: "meta" }, `${pod.category ?? ""} · ${pod.price_sui ?? "?"} SUI · sold ${pod.purchase_count ?? 0}`));
}

async function loadDatapods(form = $("#market-search")) {
  const params = new URLSearchParams();
  for (const [name, value] of new FormData(form)) if (value) params.set(name, value);
  const list = $("#datapods");
  try {
    const page = await api("GET", `/api/v1/datapods?${params}`);
    list.replaceChildren(...(page.items ?? page.datapods ?? []).map((pod) => {
      const card = datapodCard(pod);
      card.dataset.key = pod.id;
      return card;
    }));
  } catch (error) {
    list.replaceChildren(element("li", { class: "error" }, `Could not load datapods: ${error.message}`));
  }
}

$("#market-search").addEventListener("submit", (event) => { event.preventDefault(); loadDatapods(event.target); });

async function watchMarket() {
  await loadDatapods();
  await hub.subscribe("/marketplace", "market", {
    onGap: loadDatapods,
    onEvent(event) {
      const pod = event.data.datapod ?? event.data;
      const id = pod.id ?? pod.datapod_id;
      if (event.type === "datapod_unpublished") {
        $("#datapods").querySelector(`[data-key="${CSS.escape(id)}"]`)?.remove();
        return;
      }
      const existing = $("#datapods").querySelector(`[data-key="${CSS.escape(id)}"]`);
      const merged = { ...(existing?.pod ?? {}), ...pod, id };
      const card = upsert($("#datapods"), id, datapodCard(merged), { prepend: !existing });
      card.pod = merged;
    },
  });
}

// --- purchases ----------------------------------------------------------------------------

function purchaseRow(purchase) {
  const percent = purchase.percent ?? (purchase.status === "completed" ? 100 : 0);
  const row = element("li", { dataset: { purchaseId: purchase.purchase_id ?? purchase.id, status: purchase.status } },
    element("strong", {}, purchase.datapod_title ?? purchase.datapod_id ?? "purchase"), " ",
    element("span", { class: "status" }, `${purchase.status ?? ""} ${purchase.step ?? ""}`), " ",
    element("progress", { max: "100", value: String(percent) }), ` ${percent}%`);
  if (purchase.status === "completed") {
    row.append(" ", element("a", { href: "#", class: "download" }, "Download"));
    row.querySelector(".download").addEventListener("click", (event) => {
      event.preventDefault();
      download(purchase.purchase_id ?? purchase.id);
    });
  }
  return row;
}

async function download(purchaseId) {
  const response = await fetch(`/api/v1/purchases/${purchaseId}/download`, {
    headers: { Authorization: `Bearer ${session.token}` } });
  const blob = await response.blob();
  const link = element("a", { href: URL.createObjectURL(blob), download: `datapod-${purchaseId}` });
  link.click();
}

async function watchPurchases() {
  const list = $("#purchases");
  const load = async () => {
    const data = await api("GET", "/api/v1/purchases").catch(() => ({ items: [] }));
    list.replaceChildren(...(data.items ?? data.purchases ?? []).map((p) => {
      const row = purchaseRow(p);
      row.dataset.key = p.id;
      return row;
    }));
  };
  await load();
  await hub.subscribe("/purchases", `user:${me.id}`, {
    onGap: load,
    onEvent(event) {
      if (event.type === "purchase_progressed") upsert(list, event.data.purchase_id, purchaseRow(event.data));
    },
  });
}

// --- chain --------------------------------------------------------------------------------

const blockTimes = [];

function drawBlockTimes() {
  const canvas = $("#block-times");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const gaps = blockTimes.slice(1).map((t, i) => t - blockTimes[i]).slice(-60);
  const highest = Math.max(1, ...gaps);
  const width = canvas.width / 60;
  context.fillStyle = "#3656d8";
  gaps.forEach((gap, i) => {
    const height = (gap / highest) * (canvas.height - 10);
    context.fillRect(i * width, canvas.height - height, width - 2, height);
  });
}

async function watchChain() {
  await hub.subscribe("/chain", "chain:blocks", {
    onEvent(event) {
      const block = event.data;
      upsert($("#blocks"), String(block.height ?? event.id), element("li", { dataset: { height: block.height } },
        `#${block.height} · ${String(block.hash ?? block.block_hash ?? "").slice(0, 16)}… · ${block.tx_count ?? 0} tx · reward ${block.reward ?? "?"}`));
      blockTimes.push(event.ts);
      drawBlockTimes();
    },
  });
  await hub.subscribe("/chain", "chain:transactions", {
    onEvent(event) {
      const tx = event.data;
      upsert($("#transactions"), tx.hash ?? event.id, element("li", {}, `${event.type}: ${tx.hash ?? ""} ${tx.amount ?? ""}`));
    },
  });
  await hub.subscribe("/chain", "chain:mining", {
    onEvent(event) { upsert($("#mining"), event.id, element("li", {}, `${event.type}: ${JSON.stringify(event.data)}`)); },
  });
}

// --- assistant ----------------------------------------------------------------------------

const CONVERSATION_KEY = "hub.conversation";
const assistant = { conversationId: null, streamingId: null, applied: new Map() };

function messageNode(message) {
  const node = document.getElementById(`m-${message.id}`) ??
    element("div", { id: `m-${message.id}`, class: `message ${message.role}`, dataset: { status: message.status ?? "" } },
      element("span", { class: "text" }), element("ul", { class: "cards" }));
  if (!node.isConnected) $("#messages").append(node);
  return node;
}

function setText(message, text) {
  messageNode(message).querySelector(".text").textContent = text;
}

function appendDelta(data) {
  const applied = assistant.applied.get(data.message_id) ?? 0;
  if (data.seq <= applied) return; // already shown (live and resumed copies overlap)
  if (data.seq > applied + 1) { resume(data.message_id, applied); return; }
  assistant.applied.set(data.message_id, data.seq);
  const text = messageNode({ id: data.message_id, role: "assistant" }).querySelector(".text");
  text.textContent += data.text;
}

async function resume(messageId, afterSeq) {
  const data = await hub.call("/assistant", "resume_stream", { message_id: messageId, after_seq: afterSeq });
  if (data.reset) {
    setText({ id: messageId, role: "assistant" }, data.content ?? "");
    assistant.applied.set(messageId, data.content_seq ?? data.seq);
  }
  for (const delta of data.deltas) appendDelta({ message_id: messageId, ...delta });
  finish(messageId, data.status);
}

function finish(messageId, status) {
  messageNode({ id: messageId, role: "assistant" }).dataset.status = status;
  if (status !== "streaming" && assistant.streamingId === messageId) assistant.streamingId = null;
  if (status === "streaming") assistant.streamingId = messageId;
}

function showCards(data) {
  const cards = messageNode({ id: data.message_id, role: "assistant" }).querySelector(".cards");
  for (const pod of Array.isArray(data.result) ? data.result : []) {
    if (pod && pod.id) upsert(cards, pod.id, datapodCard(pod), { prepend: false });
  }
}

async function openConversation(conversationId) {
  assistant.conversationId = conversationId;
  sessionStorage.setItem(CONVERSATION_KEY, conversationId);
  const data = await hub.call("/assistant", "get_conversation", { conversation_id: conversationId });
  $("#messages").replaceChildren();
  for (const message of data.messages) {
    setText(message, message.content ?? "");
    assistant.applied.set(message.id, message.seq ?? 0);
    finish(message.id, message.status);
    messageNode(message).dataset.status = message.status ?? "";
  }
  await hub.subscribe("/assistant", `conversation:${conversationId}`, {
    onEvent(event) {
      const data = event.data;
      if (event.type === "message_started") {
        if (data.user_message) setText(data.user_message, data.user_message.content);
        messageNode({ id: data.message_id, role: "assistant" });
        finish(data.message_id, "streaming");
      } else if (event.type === "message_delta") appendDelta(data);
      else if (event.type === "tool_returned") showCards(data);
      else if (event.type === "message_completed" || event.type === "message_failed") finish(data.message_id, data.status);
    },
  });
  // A refresh in the middle of an answer: fetch what was missed, then follow it live.
  for (const message of data.messages) {
    if (message.status === "streaming") await resume(message.id, assistant.applied.get(message.id) ?? 0);
  }
}

async function loadConversations() {
  const data = await hub.call("/assistant", "list_conversations", {});
  $("#conversations").replaceChildren(...data.conversations.map((c) => {
    const item = element("li", { dataset: { key: c.id } }, element("a", { href: "#" }, c.title ?? "Untitled"));
    item.querySelector("a").addEventListener("click", (event) => { event.preventDefault(); openConversation(c.id); });
    return item;
  }));
}

$("#new-conversation").addEventListener("click", async () => {
  const data = await hub.call("/assistant", "create_conversation", {});
  await loadConversations();
  await openConversation(data.conversation.id);
});

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const content = form.content.value.trim();
  if (!content) return;
  if (!assistant.conversationId) {
    const created = await hub.call("/assistant", "create_conversation", {});
    await openConversation(created.conversation.id);
  }
  const ack = await hub.call("/assistant", "send_message", {
    conversation_id: assistant.conversationId, content, client_msg_id: crypto.randomUUID() });
  form.content.value = "";
  setText(ack.user_message, ack.user_message.content);
  messageNode(ack.assistant_message);
  finish(ack.assistant_message.id, ack.assistant_message.status);
  loadConversations();
});

$("#stop").addEventListener("click", async () => {
  if (assistant.streamingId) await hub.call("/assistant", "stop_generation", { message_id: assistant.streamingId });
});

async function watchAssistant() {
  await loadConversations();
  const remembered = sessionStorage.getItem(CONVERSATION_KEY);
  if (remembered) await openConversation(remembered).catch(() => sessionStorage.removeItem(CONVERSATION_KEY));
}

// --- games --------------------------------------------------------------------------------

function showLeaderboard(board) {
  $("#leaderboard").replaceChildren(...(board.entries ?? []).map((entry) =>
    element("li", { dataset: { userId: entry.user_id } }, `${entry.username ?? entry.user_id} · ${entry.total}`)));
}

async function watchGame(game) {
  showLeaderboard(await api("GET", `/api/v1/games/${game.game_id}/leaderboard`).catch(() => ({ entries: [] })));
  await hub.subscribe("/games", `game:${game.game_id}`, {
    onPresence(count) {
      const row = $("#games").querySelector(`[data-key="${game.game_id}"] .watchers`);
      if (row) row.textContent = `${count} watching`;
    },
    onEvent(event) {
      if (event.type === "leaderboard_changed") showLeaderboard(event.data);
      else if (event.type === "reward_earned") {
        upsert($("#game-rewards"), event.id, element("li", {},
          `${event.data.player_wallet ?? event.data.user_id} earned ${event.data.value ?? ""} (${event.data.reward_type ?? "reward"})`));
      }
    },
  });
}

async function watchGames() {
  const data = await api("GET", "/api/v1/games").catch(() => ({ games: [] }));
  $("#games").replaceChildren(...data.games.map((game) => {
    const row = element("li", { dataset: { key: String(game.game_id) } }, `${game.name} `, element("span", { class: "watchers" }));
    return row;
  }));
  if (data.games.length) await watchGame(data.games[0]);
}

// --- DAO ----------------------------------------------------------------------------------

function proposalRow(proposal) {
  const tally = proposal.tally ?? proposal;
  const result = proposal.result ? ` · ${proposal.status ?? "Closed"}: ${proposal.result}` : "";
  return element("li", { dataset: { proposalId: String(proposal.id ?? proposal.proposal_id) } },
    element("strong", {}, proposal.title ?? `Proposal ${proposal.proposal_id}`), " ",
    element("span", { class: "tally" }, `yes ${tally.yes ?? 0} · no ${tally.no ?? 0} · abstain ${tally.abstain ?? 0}${result}`));
}

async function watchDao() {
  const data = await api("GET", "/api/v1/proposals?limit=20").catch(() => ({ proposals: [] }));
  const list = $("#proposals");
  list.replaceChildren();
  for (const proposal of data.proposals) {
    const row = upsert(list, String(proposal.id), proposalRow(proposal), { prepend: false });
    row.proposal = proposal;
    await hub.subscribe("/chain", `dao:${proposal.id}`, {
      onEvent(event) {
        const current = list.querySelector(`[data-key="${proposal.id}"]`);
        const merged = { ...(current?.proposal ?? proposal), tally: event.data, ...(event.type === "proposal_closed"
          ? { status: "Closed", result: event.data.result } : {}) };
        const updated = upsert(list, String(proposal.id), proposalRow(merged), { prepend: false });
        updated.proposal = merged;
      },
    });
  }
}

// --- start --------------------------------------------------------------------------------

async function start() {
  try {
    me = session.token ? await api("GET", "/api/v1/me") : null;
  } catch {
    session.token = null;
    me = null;
  }
  $("#sign-in").hidden = Boolean(me);
  $("#dashboard").hidden = !me;
  $("#sign-out").hidden = !me;
  if (!me) return;
  $("#whoami").textContent = me.username;
  hub.reauthenticate();
  await Promise.all([watchMarket(), watchPurchases(), watchChain(), watchAssistant(), watchGames(), watchDao()]);
}

start();
