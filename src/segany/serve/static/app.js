// segany click-to-segment page: plain JavaScript, no build step, nothing fetched but this server's API.
"use strict";
const $ = (id) => document.getElementById(id);
const S = { id: null, file: null, name: "image", w: 0, h: 0, points: [], box: null, history: [], mode: "prompt",
            masks: [], candidates: [], pick: 0, seq: 0, version: 0, opening: 0 };
const imageCanvas = $("image"), overlay = $("overlay");
const COLOURS = [[30, 144, 255], [255, 99, 71], [50, 205, 50], [255, 215, 0], [186, 85, 211], [0, 206, 209],
                 [255, 140, 0], [199, 21, 133], [127, 255, 0], [70, 130, 180], [244, 164, 96], [152, 251, 152]];

function status(text, error = false) { $("status").textContent = text; $("status").className = error ? "error" : "muted"; }

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ detail: r.statusText }));
  if (!r.ok) {
    const e = new Error(`${r.status}: ${body.detail}${body.field ? ` (field ${body.field})` : ""}`);
    e.status = r.status; e.field = body.field;
    throw e;
  }
  return body;
}

function upload(file) {
  const form = new FormData();
  form.append("file", file);
  return api("/api/images", { method: "POST", body: form });
}

// POST JSON to /api/images/{id}/{action}. The server's embedding cache is an LRU shared by every
// client: when it has evicted this image (404 on image_id), upload the file again once and retry,
// instead of leaving the page failing on every click until the user reopens the file.
async function onImage(action, body) {
  const call = () => api(`/api/images/${S.id}/${action}`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                            body: JSON.stringify(body) });
  try { return await call(); } catch (e) {
    if (e.status !== 404 || e.field !== "image_id" || !S.file) throw e;
    S.id = (await upload(S.file)).id;
    return await call();
  }
}

// COCO compressed RLE (column-major counts) → Uint8Array(h*w), row-major; as pycocotools' rleFrString.
function decodeRle(rle) {
  const [h, w] = rle.size, s = rle.counts, cnts = [];
  for (let p = 0; p < s.length;) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (cnts.length > 2) x += cnts[cnts.length - 2];
    cnts.push(x);
  }
  const m = new Uint8Array(h * w);
  let i = 0, v = 0;
  for (const c of cnts) {
    if (v) for (let j = i; j < i + c; j++) m[(j % h) * w + ((j / h) | 0)] = 1;
    i += c; v ^= 1;
  }
  return m;
}

async function openFile(file) {
  if (!file) return;
  const mine = ++S.opening; // a file opened after this one wins, whichever upload ends first
  // Decoded here first (EXIF orientation applied, as the server does): a file the browser cannot
  // show (TIFF, ...) is refused with that reason rather than encoded on the server for nothing.
  let bitmap;
  try { bitmap = await createImageBitmap(file); } catch (e) {
    if (mine === S.opening) status(`${file.name}: this browser cannot display it (${e.message}); open a PNG, JPEG or WebP image`, true);
    return;
  }
  status(`uploading ${file.name}…`);
  try {
    const info = await upload(file);
    if (mine !== S.opening) return;
    Object.assign(S, { id: info.id, file, name: file.name.replace(/\.[^.]*$/, "") || "image", w: info.width, h: info.height });
    for (const c of [imageCanvas, overlay]) { c.width = info.width; c.height = info.height; }
    imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
    $("hint").hidden = true; $("stage").hidden = false;
    clearAll();
    for (const b of ["everything", "clear"]) $(b).disabled = false;
    status(`${file.name}: ${info.width}×${info.height}, embedding cached (id ${info.id.slice(0, 8)}…)`);
  } catch (e) { if (mine === S.opening) status(`upload failed: ${e.message}`, true); }
}

function clearAll() {
  Object.assign(S, { points: [], box: null, history: [], mode: "prompt", masks: [], candidates: [], pick: 0 });
  S.seq++;
  draw(); updateButtons();
}

function updateButtons() {
  $("undo").disabled = S.history.length === 0;
  for (const b of ["dl-png", "dl-coco", "dl-yolo"]) $(b).disabled = S.masks.length === 0;
  $("everything").classList.toggle("active", S.mode === "everything");
  const box = $("candidates");
  box.replaceChildren();
  if (S.mode === "prompt" && S.candidates.length > 1) {
    S.candidates.forEach((m, i) => {
      const b = document.createElement("button");
      b.textContent = `mask ${i + 1} · ${m.score.toFixed(3)}`;
      b.className = i === S.pick ? "active" : "";
      b.onclick = () => { S.pick = i; S.masks = [S.candidates[i]]; draw(); updateButtons(); };
      box.append(b);
    });
  }
}

async function segment() {
  if (!S.points.length && !S.box) {
    // No prompt left (cleared, or undo of "everything" run on none): back to prompting, and a
    // request still in flight (++seq) cannot bring back masks of prompts no longer on screen.
    ++S.seq; Object.assign(S, { mode: "prompt", masks: [], candidates: [] });
    draw(); updateButtons(); status("click or drag on the image to segment");
    return;
  }
  const seq = ++S.seq, body = { multimask_output: $("multimask").checked, polygons: true };
  if (S.points.length) {
    body.points = [S.points.map((p) => [p.x, p.y])];
    body.labels = [S.points.map((p) => p.label)];
  }
  if (S.box) body.boxes = [S.box];
  status("segmenting…");
  try {
    const res = await onImage("prompt", body);
    if (seq !== S.seq) return; // a newer click already asked again
    S.mode = "prompt"; S.candidates = res.masks; S.pick = 0; S.masks = res.masks.slice(0, 1);
    draw(); updateButtons();
    status(`${res.masks.length} mask(s) in ${res.time_ms} ms${res.warnings.length ? " · " + res.warnings.join("; ") : ""}`);
  } catch (e) {
    if (seq !== S.seq) return; // an older request's error must not overwrite a newer answer
    // The previous mask no longer matches the prompts on screen: neither shown nor downloadable.
    S.masks = []; S.candidates = []; draw(); updateButtons();
    status(e.message, true);
  }
}

async function everything() {
  const seq = ++S.seq;
  status("segmenting everything… (this takes a while)");
  try {
    const res = await onImage("everything", { polygons: true });
    if (seq !== S.seq) return;
    S.history.push({ points: S.points, box: S.box }); // undo brings back the prompts it replaced
    Object.assign(S, { mode: "everything", masks: res.masks, candidates: [], points: [], box: null });
    draw(); updateButtons();
    status(`${res.masks.length} masks in ${res.time_ms} ms`);
  } catch (e) { if (seq === S.seq) status(e.message, true); }
}

function draw(drag) {
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, S.w, S.h);
  if (S.masks.length) {
    const img = ctx.createImageData(S.w, S.h), px = img.data;
    S.masks.forEach((m, k) => {
      const bits = decodeRle(m.rle), [r, g, b] = COLOURS[k % COLOURS.length];
      const edgesOnly = S.mode === "everything";
      for (let i = 0; i < bits.length; i++) {
        if (!bits[i]) continue;
        const x = i % S.w, y = (i / S.w) | 0;
        const edge = x === 0 || y === 0 || x === S.w - 1 || y === S.h - 1 || !bits[i - 1] || !bits[i + 1] ||
                     !bits[i - S.w] || !bits[i + S.w];
        px[4 * i] = r; px[4 * i + 1] = g; px[4 * i + 2] = b;
        px[4 * i + 3] = edge ? 255 : (edgesOnly ? 70 : 120);
      }
    });
    ctx.putImageData(img, 0, 0);
  }
  const rad = Math.max(3, Math.round(Math.max(S.w, S.h) / 150));
  for (const p of S.points) {
    ctx.beginPath(); ctx.arc(p.x, p.y, rad, 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? "#22c55e" : "#ef4444"; ctx.fill();
    ctx.lineWidth = Math.max(1, rad / 3); ctx.strokeStyle = "#fff"; ctx.stroke();
  }
  for (const bx of [S.box, drag].filter(Boolean)) {
    ctx.lineWidth = Math.max(1, rad / 2); ctx.strokeStyle = "#facc15";
    ctx.strokeRect(bx[0], bx[1], bx[2] - bx[0], bx[3] - bx[1]);
  }
  if (!drag) overlay.dataset.version = String(++S.version);
}

function toImage(ev) {
  const r = overlay.getBoundingClientRect();
  const x = Math.min(S.w, Math.max(0, ((ev.clientX - r.left) / r.width) * S.w));
  const y = Math.min(S.h, Math.max(0, ((ev.clientY - r.top) / r.height) * S.h));
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

let down = null;
overlay.addEventListener("contextmenu", (ev) => ev.preventDefault());
// Left (0) and right (2) buttons only: a middle click is for scrolling, not a positive point.
overlay.addEventListener("mousedown", (ev) => {
  if (S.id && (ev.button === 0 || ev.button === 2)) down = { at: toImage(ev), sx: ev.clientX, sy: ev.clientY, button: ev.button };
});
// Move and release are followed on the window: a box dragged past the image's edge ends there
// (toImage clamps), instead of being lost with the drag left half-open.
window.addEventListener("mousemove", (ev) => {
  if (!down || down.button !== 0) return;
  const [x, y] = toImage(ev);
  if (Math.hypot(ev.clientX - down.sx, ev.clientY - down.sy) > 5) draw([down.at[0], down.at[1], x, y].map(Math.round));
});
window.addEventListener("mouseup", (ev) => {
  if (!down || ev.button !== down.button) return;
  const start = down; down = null;
  const [x, y] = toImage(ev);
  S.history.push({ points: S.points.slice(), box: S.box });
  if (start.button === 0 && Math.hypot(ev.clientX - start.sx, ev.clientY - start.sy) > 5) {
    S.box = [Math.min(start.at[0], x), Math.min(start.at[1], y), Math.max(start.at[0], x), Math.max(start.at[1], y)];
  } else { // a point goes where the button went down
    const label = start.button === 2 || $("negative").checked ? 0 : 1;
    S.points = S.points.concat([{ x: start.at[0], y: start.at[1], label }]);
  }
  if (S.mode === "everything") { S.masks = []; S.mode = "prompt"; }
  draw(); updateButtons(); segment();
});

$("undo").onclick = () => { const h = S.history.pop(); if (h) { S.points = h.points; S.box = h.box; segment(); updateButtons(); } };
$("clear").onclick = () => { clearAll(); status("cleared"); };
$("everything").onclick = everything;
$("multimask").onchange = () => { if (S.mode === "prompt") segment(); }; // show the choice at once
// Emptied after each pick: choosing the same file again (e.g. to start over) fires change again.
$("file").onchange = (ev) => { const f = ev.target.files[0]; ev.target.value = ""; openFile(f); };
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("dragging"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("dragging"); openFile(ev.dataTransfer.files[0]); });

function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("dl-png").onclick = () => {
  // Prompt mode: the selected mask, white on black. Everything: mask i has grey level i + 1.
  const c = document.createElement("canvas"); c.width = S.w; c.height = S.h;
  const ctx = c.getContext("2d"), img = ctx.createImageData(S.w, S.h), px = img.data;
  for (let i = 0; i < px.length; i += 4) px[i + 3] = 255;
  S.masks.forEach((m, k) => {
    const bits = decodeRle(m.rle), v = S.mode === "everything" ? Math.min(255, k + 1) : 255;
    for (let i = 0; i < bits.length; i++) if (bits[i]) px[4 * i] = px[4 * i + 1] = px[4 * i + 2] = v;
  });
  ctx.putImageData(img, 0, 0);
  c.toBlob((blob) => download(`${S.name}_mask.png`, blob), "image/png");
};

$("dl-coco").onclick = () => {
  const coco = { images: [{ id: 1, file_name: S.file ? S.file.name : S.name, width: S.w, height: S.h }],
                 categories: [{ id: 1, name: "object" }],
                 annotations: S.masks.map((m, i) => ({ id: i + 1, image_id: 1, category_id: 1, segmentation: m.rle,
                                                      area: m.area, bbox: m.bbox, iscrowd: 0, score: m.score })) };
  download(`${S.name}_coco.json`, new Blob([JSON.stringify(coco)], { type: "application/json" }));
};

$("dl-yolo").onclick = () => {
  // As segany's own YOLO-seg export: a thin mask's 1- or 2-vertex polygon is closed back on itself
  // to the 3 vertices a YOLO polygon needs ([a, b] → [a, b, a]), not dropped.
  const lines = S.masks.filter((m) => m.polygon && m.polygon.length)
    .map((m) => Array.from({ length: Math.max(3, m.polygon.length) }, (_, i) => m.polygon[i % m.polygon.length]))
    .map((poly) => "0 " + poly.map(([x, y]) => `${(x / S.w).toFixed(6)} ${(y / S.h).toFixed(6)}`).join(" "));
  download(`${S.name}.txt`, new Blob([lines.join("\n") + (lines.length ? "\n" : "")], { type: "text/plain" }));
};

api("/api/models").then((r) => { $("model").textContent = r.models.map((m) => `${m.name} (${m.device})`).join(", "); })
  .catch(() => {});
