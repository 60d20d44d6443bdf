// llamaherd web chat: streams replies from this server's OpenAI API (/v1/chat/completions), keeps conversations
// in localStorage, and renders model output as DOM nodes built with textContent (never innerHTML), so no text a
// model writes can become markup.
"use strict";

const STORE_KEY = "llamaherd.conversations";
const SETTINGS_KEY = "llamaherd.settings";
const $ = (id) => document.getElementById(id);

const state = {
  conversations: load(STORE_KEY, []),
  settings: Object.assign({ model: "", system: "", temperature: 0.7, top_p: 0.95, max_tokens: 512, apiKey: "",
                            tools: "", tool_choice: "auto" },
                          load(SETTINGS_KEY, {})),
  current: null,
  controller: null,  // AbortController of the reply being streamed
};

function load(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; } catch (e) { return fallback; }
}
function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
}
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.apiKey) h["Authorization"] = "Bearer " + state.settings.apiKey;
  return h;
}
function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

// ---- markdown, rendered safely --------------------------------------------------------------------------------
// A small subset: fenced code blocks, headings, bullet and numbered lists, paragraphs, and inline `code`,
// **bold**, *italic* and http(s) links. Every piece of text goes in through textContent.

function renderMarkdown(text, into) {
  into.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```/.test(lines[i])) code.push(lines[i++]);
      i++;  // the closing fence (or the end of a reply still streaming)
      const pre = el("pre");
      const c = el("code", fence[1] ? "language-" + fence[1] : "", code.join("\n"));
      pre.appendChild(c);
      into.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = el("h" + Math.min(heading[1].length + 2, 6));
      inline(heading[2], h);
      into.appendChild(h);
      i++;
      continue;
    }
    const item = /^\s*([-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = el(ordered ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = el("li");
        inline(lines[i].replace(item, ""), li);
        list.appendChild(li);
        i++;
      }
      into.appendChild(list);
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i]) &&
           !item.test(lines[i])) para.push(lines[i++]);
    const p = el("p");
    inline(para.join("\n"), p);
    into.appendChild(p);
  }
}

function inline(text, into) {
  const pattern = /`([^`]+)`|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) into.appendChild(document.createTextNode(text.slice(last, m.index)));
    if (m[1] !== undefined) into.appendChild(el("code", "", m[1]));
    else if (m[2] !== undefined) into.appendChild(el("strong", "", m[2]));
    else if (m[3] !== undefined) into.appendChild(el("em", "", m[3]));
    else {
      const a = el("a", "", m[4]);
      a.href = m[5];  // only http(s) URLs match the pattern: no javascript: links
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      into.appendChild(a);
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) into.appendChild(document.createTextNode(text.slice(last)));
}

// ---- conversations --------------------------------------------------------------------------------------------

function newConversation() {
  const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
  state.conversations.unshift(conv);
  state.current = conv;
  save();
  renderAll();
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = el("li", conv === state.current ? "active" : "");
    const title = el("span", "title", conv.title);
    title.onclick = () => { state.current = conv; $("app").classList.remove("show-sidebar"); renderAll(); };
    const del = el("button", "delete", "\u00d7");
    del.type = "button";
    del.title = "delete this conversation";
    del.onclick = () => {
      state.conversations = state.conversations.filter((c) => c !== conv);
      if (state.current === conv) state.current = state.conversations[0] || null;
      save();
      if (!state.current) newConversation(); else renderAll();
    };
    li.append(title, del);
    list.appendChild(li);
  }
}

function messageNode(msg) {
  const node = el("div", "msg " + msg.role + (msg.error ? " error" : ""));
  node.appendChild(el("div", "role", msg.role === "assistant" ? (msg.model || "assistant") : msg.role));
  const body = el("div", "body");
  node.appendChild(body);
  fillMessage(node, msg);
  return node;
}

function fillMessage(node, msg) {
  const body = node.querySelector(".body");
  if (msg.role === "assistant") renderMarkdown(msg.content || "", body);
  else { body.replaceChildren(); body.appendChild(el("p", "", msg.content)); }
  node.querySelectorAll(".tool-call, .stats").forEach((n) => n.remove());
  for (const call of msg.tool_calls || []) {
    node.appendChild(el("div", "tool-call", "tool call: " + call.function.name + "(" + call.function.arguments + ")"));
  }
  if (msg.stats) node.appendChild(el("div", "stats", msg.stats));
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  for (const msg of (state.current ? state.current.messages : [])) box.appendChild(messageNode(msg));
  box.scrollTop = box.scrollHeight;
}

function renderAll() { renderConversations(); renderMessages(); }

// ---- talking to the server ------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) {
      notice("This server requires an API key: enter it under Settings.");
      $("settings").hidden = false;
      return;
    }
    const data = await r.json();
    select.replaceChildren();
    for (const m of data.data || []) {
      const opt = el("option", "", m.id);
      opt.value = m.id;
      select.appendChild(opt);
    }
    if (state.settings.model && [...select.options].some((o) => o.value === state.settings.model)) {
      select.value = state.settings.model;
    }
    state.settings.model = select.value;
    notice("");
  } catch (e) {
    notice("Cannot reach the server: " + e.message);
  }
}

function requestBody() {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of state.current.messages) {
    if (m.error) continue;
    const out = { role: m.role, content: m.content || "" };
    if (m.tool_calls && m.tool_calls.length) out.tool_calls = m.tool_calls;
    messages.push(out);
  }
  const body = { model: s.model || undefined, messages, stream: true, stream_options: { include_usage: true } };
  for (const k of ["temperature", "top_p", "max_tokens"]) {
    const v = Number(s[k]);
    if (s[k] !== "" && s[k] !== null && Number.isFinite(v)) body[k] = v;
  }
  if (s.tools.trim()) {
    let tools;
    try { tools = JSON.parse(s.tools); } catch (e) { throw new Error("Tools is not valid JSON: " + e.message); }
    if (!Array.isArray(tools)) throw new Error("Tools must be a JSON array of tool definitions");
    body.tools = tools;
    body.tool_choice = s.tool_choice;
  }
  return body;
}

async function send(text) {
  const conv = state.current;
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  const reply = { role: "assistant", content: "", model: state.settings.model };
  let body;
  try {
    body = requestBody();
  } catch (e) {  // bad settings (tools JSON): nothing is sent, the message goes back into the input box
    conv.messages.pop();
    $("input").value = text;
    notice(e.message);
    save();
    renderAll();
    return;
  }
  notice("");
  conv.messages.push(reply);
  save();
  renderAll();
  const node = $("messages").lastElementChild;
  node.classList.add("streaming");
  setBusy(true);
  const controller = new AbortController();
  state.controller = controller;
  const started = performance.now();
  let firstToken = null, pieces = 0, usage = null;
  const calls = [];
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            if (delta.content) {
              if (firstToken === null) firstToken = performance.now();
              reply.content += delta.content;
              pieces++;
            }
            for (const tc of delta.tool_calls || []) {
              const k = tc.index || 0;
              calls[k] = calls[k] || { id: tc.id, type: "function", function: { name: "", arguments: "" } };
              if (tc.function && tc.function.name) calls[k].function.name += tc.function.name;
              if (tc.function && tc.function.arguments) calls[k].function.arguments += tc.function.arguments;
            }
          }
        }
        if (calls.length) reply.tool_calls = calls.filter(Boolean);
        fillMessage(node, reply);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    reply.stats = speed(usage ? usage.completion_tokens : pieces, firstToken, started);
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stats = "stopped \u00b7 " + speed(pieces, firstToken, started);
    } else {
      reply.error = true;
      reply.content = "Error: " + e.message;
      reply.stats = "";
    }
  } finally {
    state.controller = null;
    node.classList.remove("streaming");
    node.classList.toggle("error", !!reply.error);
    fillMessage(node, reply);
    node.classList.add("done");
    save();
    setBusy(false);
  }
}

function speed(tokens, firstToken, started) {
  const now = performance.now();
  const gen = firstToken === null ? 0 : (now - firstToken) / 1000;
  const rate = gen > 0 && tokens > 1 ? ((tokens - 1) / gen).toFixed(1) + " tokens/s" : "";
  return [tokens + " tokens", rate, ((now - started) / 1000).toFixed(2) + " s"].filter(Boolean).join(" \u00b7 ");
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = false;
}

// ---- wiring ---------------------------------------------------------------------------------------------------

function bindSettings() {
  const fields = { system: "system", temperature: "temperature", top_p: "top_p", max_tokens: "max_tokens",
                   tools: "tools", tool_choice: "tool_choice", "api-key": "apiKey" };
  for (const [id, key] of Object.entries(fields)) {
    $(id).value = state.settings[key];
    $(id).addEventListener($(id).tagName === "SELECT" ? "change" : "input", () => {
      state.settings[key] = $(id).value;
      save();
      if (key === "apiKey") loadModels();
    });
  }
  $("model").addEventListener("change", () => { state.settings.model = $("model").value; save(); });
  $("toggle-settings").onclick = () => {
    $("settings").hidden = !$("settings").hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!$("settings").hidden));
  };
  $("toggle-sidebar").onclick = () => $("app").classList.toggle("show-sidebar");
}

function init() {
  bindSettings();
  state.current = state.conversations[0] || null;
  if (!state.current) newConversation(); else renderAll();
  $("new-chat").onclick = () => { newConversation(); $("app").classList.remove("show-sidebar"); };
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").onclick = () => { if (state.controller) state.controller.abort(); };
  loadModels();
}

init();
