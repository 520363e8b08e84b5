// The search page: talks to /api/* of the same server only; builds the DOM with
// textContent (never innerHTML), so captions and ids are shown, not interpreted.
"use strict";

const $ = (id) => document.getElementById(id);
let run = { columns: {}, limits: {} };
let last = null; // the last query, re-run when a control changes
let previewUrl = null;
let latest = 0; // answers to older queries that arrive late are dropped

async function api(url, options) {
  const res = await fetch(url, options);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const detail = body && body.detail;
    throw new Error(typeof detail === "string" ? detail
      : detail ? JSON.stringify(detail) : `${res.status} ${res.statusText}`);
  }
  return body;
}

function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = !text;
}

function params(extra, text = false) {
  const p = new URLSearchParams(extra);
  if (text && $("via").value) p.set("via", $("via").value);
  p.set("modality", $("modality").value);
  p.set("k", $("k").value || "10");
  for (const name of ["split", "label"]) {
    if ($(name).value) p.set(name, $(name).value);
  }
  return p;
}

function describe(query) {
  if (query.kind === "text") return `“${query.text.trim()}”`;
  if (query.kind === "image") return `image ${query.file.name}`;
  return `more like ${query.id}`;
}

function preview(src) {
  const img = $("query-preview");
  img.hidden = !src;
  if (src) img.src = src;
}

async function search(query) {
  const mine = ++latest;
  last = query;
  preview(query.preview);
  say("");
  document.body.classList.add("busy");
  $("status").textContent = `searching ${describe(query)}…`;
  try {
    let result;
    if (query.kind === "text") {
      result = await api(`/api/search?${params({ q: query.text }, true)}`);
    } else if (query.kind === "image") {
      const form = new FormData();
      form.append("file", query.file, query.file.name);
      result = await api(`/api/search/image?${params({})}`, { method: "POST", body: form });
    } else {
      result = await api(`/api/similar?${params({ id: query.id, source: query.source })}`);
    }
    if (mine === latest) show(result, query);
  } catch (err) {
    if (mine !== latest) return;
    $("results").replaceChildren();
    $("status").textContent = "";
    say(err.message);
  } finally {
    if (mine === latest) document.body.classList.remove("busy");
  }
}

function field(cls, text) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

function thumb(hit, kind) {
  const imageId = kind === "images" ? hit.id : hit.image_id;
  if (!hit.image || !imageId) return field("noimg", "no image");
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = hit.caption || hit.id;
  img.src = `/api/thumb?${new URLSearchParams({ id: imageId })}`;
  img.addEventListener("error", () => img.replaceWith(field("noimg", "image unavailable")));
  return img;
}

function show(result, query) {
  const kind = (run.columns[result.column] || {}).kind || "images";
  const cards = result.hits.map((hit) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.title = "Search by this result";
    card.dataset.id = hit.id;
    card.append(thumb(hit, kind), field("score", hit.score.toFixed(3)),
      field("caption", hit.caption || ""), field("label", hit.label || ""),
      field("id", hit.id));
    if (hit.duplicates && hit.duplicates.length) {  // copies found by `dedup`
      card.classList.add("dup");
      card.append(field("dups", `duplicates: ${hit.duplicates.join(", ")}`));
    }
    card.addEventListener("click", () => search({
      kind: "similar", id: hit.id, source: kind === "images" ? "image" : "text",
      preview: (card.querySelector("img") || {}).src || null,
    }));
    return card;
  });
  $("results").replaceChildren(...cards);
  const n = result.hits.length;
  $("status").textContent = `${n} hit${n === 1 ? "" : "s"} for ${describe(query)} `
    + `in ${result.column}${result.via ? ` via ${result.via}` : ""}`;
  if (result.notes.length) say(result.notes.join(" "), "note");
  else if (!n) say("No rows match these filters.", "note");
}

function searchFile(file) {
  if (!file) return;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  search({ kind: "image", file, preview: previewUrl });
}

function fill(select, values) {
  for (const v of values) {
    const opt = document.createElement("option");
    opt.value = v;
    opt.textContent = v;
    select.append(opt);
  }
}

async function start() {
  try {
    run = await api("/api/health");
  } catch (err) {
    $("models").textContent = "";
    say(`cannot read the run: ${err.message}`);
    return;
  }
  $("run-name").textContent = run.run.split("/").filter(Boolean).pop() || run.run;
  $("run-name").title = run.run;
  document.title = `Search ${$("run-name").textContent}`;
  $("models").textContent = "Models: " + Object.entries(run.models)
    .map(([name, m]) => `${name} = ${m.model}${m.pretrained ? ` (${m.pretrained})` : ""}`)
    .join(" · ");
  fill($("split"), run.splits);
  const vias = Object.values(run.adapters || {}).filter((a) => !a.problem);
  for (const a of vias) {
    const opt = document.createElement("option");
    opt.value = a.name;
    opt.textContent = `${a.name} (${a.source} → ${a.target})`;
    $("via").append(opt);
  }
  $("via-box").hidden = !vias.length;
  fill($("label"), run.labels);
  $("k").max = run.limits.max_k;
  $("q").maxLength = run.limits.max_query_chars;
  const problems = Object.values(run.columns).map((c) => c.problem).filter(Boolean);
  if (problems.length) say(problems.join(" "), run.status === "ok" ? "note" : "error");
}

$("query-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  search({ kind: "text", text: $("q").value });
});
$("file").addEventListener("change", () => searchFile($("file").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (ev) => {
  ev.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  searchFile(ev.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" || ev.key === " ") $("file").click();
});
for (const id of ["modality", "k", "split", "label", "via"]) {
  $(id).addEventListener("change", () => last && search(last));
}
start();
