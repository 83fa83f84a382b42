// tpas search page: plain DOM, no framework, no external resources (the CSP allows only 'self').
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form"), input = $("query"), statusLine = $("status"), grid = $("results");
let limits = { max_query_chars: 300, max_k: 100, max_rerank: 100 };
let pending = null;

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
  img.src = hit.url;
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
    const res = await fetch("/api/search?" + params.toString(), { signal: pending.signal });
    const body = await res.json();
    if (!res.ok) { setStatus("Error: " + (body.error || res.statusText), true); return; }
    grid.replaceChildren(...body.results.map(card));
    const total = performance.now() - started;
    const shown = body.query.length > 90 ? body.query.slice(0, 87) + "…" : body.query;
    setStatus(body.results.length + " results for “" + shown + "” · server " + body.latency_ms.toFixed(1) +
      " ms · round trip " + total.toFixed(0) + " ms" + (body.rerank ? " · ITM re-ranked top " + body.rerank : " · ITC only"));
    document.body.dataset.state = "done";
  } catch (err) {
    if (err.name !== "AbortError") setStatus("Error: " + err.message, true);
  } finally {
    $("go").disabled = false;
  }
}

async function loadExamples() {
  try {
    const res = await fetch("/api/examples");
    const body = await res.json();
    limits = body.limits || limits;
    input.maxLength = limits.max_query_chars;
    if (!limits.max_rerank) {  // the index has no image tokens: ITC only
      $("rerank").checked = false;
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
loadExamples();
const initial = new URLSearchParams(location.search).get("q");
if (initial) { input.value = initial; search(initial); }
