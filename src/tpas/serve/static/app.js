// tpas search page: plain DOM, no framework, no external resources (the CSP allows only 'self').
// When the server wants a bearer token, the page asks for it once (kept for this tab only) and
// sends it with every API call; images are then fetched with it too and shown from blob: URLs.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form"), input = $("query"), statusLine = $("status"), grid = $("results");
let limits = { max_query_chars: 300, max_k: 100, max_rerank: 100 };
let pending = null;
let token = sessionStorage.getItem("tpas-token") || "";
let blobUrls = [];

async function api(url, options) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const res = await fetch(url, { ...(options || {}), headers: headers });
  if (res.status === 401) {
    await askForToken();
    return api(url, options);
  }
  return res;
}

let tokenPrompt = null;

function askForToken() {
  // Resolves once the user has entered a token (the request is then tried again); requests that
  // are refused meanwhile (ten images at once) wait for the same answer.
  if (tokenPrompt) return tokenPrompt;
  const box = $("auth");
  box.hidden = false;
  $("token").focus();
  tokenPrompt = new Promise((resolve) => {
    box.onsubmit = (ev) => {
      ev.preventDefault();
      token = $("token").value.trim();
      sessionStorage.setItem("tpas-token", token);
      $("token").value = "";
      box.hidden = true;
      tokenPrompt = null;
      resolve();
    };
  });
  return tokenPrompt;
}

async function showImage(img, url) {
  if (!token) { img.src = url; return; }
  const res = await api(url);
  if (!res.ok) return;
  const blobUrl = URL.createObjectURL(await res.blob());
  blobUrls.push(blobUrl);
  img.src = blobUrl;
}

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(3);
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "card";
  const link = document.createElement("a");
  link.href = hit.url;
  link.target = "_blank";
  link.rel = "noopener";
  const img = document.createElement("img");
  showImage(img, hit.url);
  img.alt = "gallery image " + hit.id;
  img.loading = "eager";
  link.appendChild(img);
  const meta = document.createElement("div");
  meta.className = "meta";
  const top = document.createElement("div");
  top.className = "top";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + hit.rank;
  const score = document.createElement("span");
  score.textContent = fmt(hit.score);
  score.title = "final score";
  top.append(rank, score);
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = hit.id;
  id.title = hit.id;
  const scores = document.createElement("div");
  scores.textContent = "itc " + fmt(hit.itc_score) + (hit.itm_score === null ? "" : " · itm " + fmt(hit.itm_score));
  meta.append(top, id, scores);
  div.append(link, meta);
  return div;
}

async function search(query) {
  query = query.trim();
  if (!query) { setStatus("Type a description first.", true); return; }
  if (pending) pending.abort();
  pending = new AbortController();
  const k = $("k").value;
  const rerank = $("rerank").checked ? Math.max(1, Math.min(limits.max_rerank, Number($("rerank-k").value) || 1)) : 0;
  const params = new URLSearchParams({ q: query, k: k, rerank: String(rerank) });
  history.replaceState(null, "", "?" + new URLSearchParams({ q: query }).toString());
  $("go").disabled = true;
  setStatus("Searching…");
  const started = performance.now();
  try {
    const res = await api("/api/search?" + params.toString(), { signal: pending.signal });
    const body = await res.json();
    if (!res.ok) { setStatus("Error: " + (body.error || res.statusText), true); return; }
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
    blobUrls = [];
    grid.replaceChildren(...body.results.map(card));
    const total = performance.now() - started;
    const shown = body.query.length > 90 ? body.query.slice(0, 87) + "…" : body.query;
    const line = body.results.length + " results for “" + shown + "” · server " + body.latency_ms.toFixed(1) +
      " ms · round trip " + total.toFixed(0) + " ms" + (body.rerank ? " · ITM re-ranked top " + body.rerank : " · ITC only");
    setStatus(body.understood === false ? "Note: " + body.notice + ". " + line : line, body.understood === false);
    document.body.dataset.state = "done";
  } catch (err) {
    if (err.name !== "AbortError") setStatus("Error: " + err.message, true);
  } finally {
    $("go").disabled = false;
  }
}

async function loadExamples() {
  try {
    const res = await api("/api/examples");
    const body = await res.json();
    limits = body.limits || limits;
    // The re-rank default is the server's: on only when the model's validation showed re-ranking helps.
    const depth = (body.defaults && body.defaults.rerank) || 0;
    $("rerank").checked = depth > 0;
    if (depth > 0) $("rerank-k").value = depth;
    if (!limits.max_rerank) {  // the index has no image tokens: ITC only
      $("rerank").disabled = true;
      $("rerank-k").disabled = true;
    } else {
      $("rerank-k").max = limits.max_rerank;
    }
    const box = $("examples");
    for (const text of body.examples) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "ex";
      b.textContent = text;
      b.title = text;
      b.addEventListener("click", () => { input.value = text; search(text); });
      box.appendChild(b);
    }
  } catch (err) {
    setStatus("Could not load example queries: " + err.message, true);
  }
}

form.addEventListener("submit", (ev) => { ev.preventDefault(); search(input.value); });
const initial = new URLSearchParams(location.search).get("q");
loadExamples().then(() => { if (initial) { input.value = initial; search(initial); } });
