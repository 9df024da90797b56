// The API docs page: renders /api/v1/openapi.json and /api/v1/asyncapi.json with DOM calls only
// (textContent only, no HTML parsing), so it runs under `script-src 'self'` and shows text as text.

const OPENAPI_URL = "/api/v1/openapi.json";
const ASYNCAPI_URL = "/api/v1/asyncapi.json";

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function schemaBlock(schema) {
  const details = el("details");
  details.append(el("summary", "schema"), el("pre", JSON.stringify(schema, null, 2)));
  return details;
}

function parameterTable(parameters) {
  const table = el("table");
  const head = el("tr");
  for (const title of ["name", "in", "required", "schema"]) head.append(el("th", title));
  table.append(head);
  for (const param of parameters) {
    const row = el("tr");
    row.append(el("td", param.name), el("td", param.in), el("td", param.required ? "yes" : "no"));
    const cell = el("td");
    cell.append(el("code", JSON.stringify(param.schema)));
    row.append(cell);
    table.append(row);
  }
  return table;
}

function renderOperation(method, path, operation) {
  const article = el("article", null, "operation");
  const title = el("h4");
  title.append(el("code", method.toUpperCase(), "method"), " ", el("code", path));
  article.append(title, el("p", operation.summary));
  if (operation.security) article.append(el("p", "Sign-in required (Authorization: Bearer <token>).", "auth"));
  if (operation.description && operation.description !== operation.summary) {
    article.append(el("p", operation.description.split("\n").slice(1).join(" ").trim()));
  }
  if (operation.parameters && operation.parameters.length) article.append(parameterTable(operation.parameters));
  const content = operation.requestBody && operation.requestBody.content;
  if (content) {
    for (const [mediaType, media] of Object.entries(content)) {
      article.append(el("p", `Body (${mediaType}${operation.requestBody.required ? "" : ", optional"}):`));
      article.append(schemaBlock(media.schema));
    }
  }
  return article;
}

function renderOpenApi(doc) {
  document.getElementById("rest-intro").textContent = doc.info.description || "";
  const byTag = new Map();
  for (const [path, operations] of Object.entries(doc.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const tag = (operation.tags && operation.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(renderOperation(method, path, operation));
    }
  }
  const container = document.getElementById("rest-operations");
  for (const tag of [...byTag.keys()].sort()) {
    const section = el("section");
    section.append(el("h3", tag), ...byTag.get(tag));
    container.append(section);
  }
}

function renderAsyncApi(doc) {
  document.getElementById("socketio-intro").textContent = doc.info.description || "";
  const container = document.getElementById("socketio-namespaces");
  for (const channel of Object.values(doc.channels)) {
    const section = el("section");
    section.append(el("h3", `Namespace ${channel.address}`), el("p", channel.summary));
    section.append(el("p", channel["x-anonymous-allowed"] ? "Anonymous connections allowed." : "Sign-in required."));
    const channels = channel["x-subscribable-channels"] || [];
    if (channels.length) section.append(el("p", `Channels (subscribe): ${channels.join(", ")}`));
    const commands = el("div");
    const events = [];
    for (const message of Object.values(channel.messages)) {
      if (message.name.endsWith(" ack")) continue;
      if (message.payload && message.payload.$ref === "#/components/schemas/Event") {
        events.push(message.description ? `${message.name} (${message.description})` : message.name);
        continue;
      }
      const article = el("article", null, "operation");
      const title = el("h4");
      title.append(el("code", "emit", "method"), " ", el("code", message.name));
      article.append(title, el("p", message.summary));
      if (message["x-sign-in-required"]) article.append(el("p", "Sign-in required.", "auth"));
      article.append(schemaBlock(message.payload));
      commands.append(article);
    }
    section.append(el("h4", "Commands (acked with {ok, data} or {ok: false, error})"), commands);
    const list = el("ul");
    for (const event of events) list.append(el("li", event));
    section.append(el("h4", "Events"), list);
    container.append(section);
  }
}

async function load(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function main() {
  const status = document.getElementById("docs-status");
  try {
    const [openapi, asyncapi] = await Promise.all([load(OPENAPI_URL), load(ASYNCAPI_URL)]);
    renderOpenApi(openapi);
    renderAsyncApi(asyncapi);
    status.textContent = `${Object.keys(openapi.paths).length} paths, ${Object.keys(asyncapi.channels).length} namespaces.`;
  } catch (error) {
    status.textContent = `Could not load the API documents: ${error.message}`;
  }
}

main();
