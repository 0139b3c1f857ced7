// The ragws viewer: open a PDF or an image, see its pages with their layout regions as the
// server renders them, read a region's text as OCR streams it (a layout region, or a rectangle
// drawn on the page), and parse the whole document to markdown. Everything goes through
// ragws.js; every server string reaches the page as text.

import { connect, RagwsError } from "./ragws.js";
import { headingLevel, renderBlock, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

// Colours per class: the parse's block types, and the layout models' own classes (the
// embedded model's and DocLayout-YOLO's), the same colour where they mean the same thing; and
// the regions a person draws.
const DRAWN = "drawn";
const CLASS_COLORS = {
  [DRAWN]: "#c71585",
  title: "#d62728",
  heading: "#8c1d40",
  text: "#1f77b4",
  list: "#4169e1",
  code: "#2f4f4f",
  table: "#ff7f0e",
  equation: "#e377c2",
  figure: "#2ca02c",
  caption: "#17a589",
  footnote: "#bc8f5f",
  header: "#7f7f7f",
  footer: "#9c9c9c",
  "plain text": "#1f77b4",
  figure_caption: "#17a589",
  table_caption: "#17a589",
  table_footnote: "#bc8f5f",
  abandon: "#9c9c9c",
  reference: "#9467bd",
  isolate_formula: "#e377c2",
  formula_caption: "#17a589",
};
// The parse's block types (docs/protocol.md), in the order the blocks legend lists them.
const BLOCK_TYPES = [
  "title", "heading", "text", "list", "code", "table",
  "equation", "figure", "caption", "footnote", "header", "footer",
];
const SPARE_COLORS = ["#008b8b", "#8b8b00", "#4b0082", "#dc143c", "#556b2f", "#00008b"];
const RENDER_SCALE = 2; // PDF pages at 144 dpi: what OCR reads well, and sharp on screen
const DRAW_MIN_PX = 6; // a drawn rectangle narrower or lower than this on screen is a slip or a tap

const params = new URLSearchParams(location.search);
// The socket beside this page ("ws" relative to it), unless ?server= names another.
const serverUrl = params.get("server") ?? new URL("ws", location.href).href;
const client = connect(serverUrl, { apiKey: params.get("api_key") });

const view = {
  doc: null, // {name, kind: "pdf" | "image", bytes, pages: Map, pageCount, urls: []}
  loading: null, // the Stream of the pdf request, or the layout promise
  ocr: null, // the Stream of the region being read
  parse: null, // the Stream of the parse request
  parsed: null, // {name, pages, done} of the last finished parse
};
const classes = new Map(); // name → {color, visible, count, countEl, checkbox}
// Drawing a region: the page in draw mode (null: none; a Shift+drag with a mouse draws on any
// page), the drag in progress, and whether the click that ends a drag is to be ignored.
const drawing = { page: null, drag: null, swallowClick: false };

// --- connection ---------------------------------------------------------------------------

client.addEventListener("state", ({ detail }) => showConnection(detail));
client.addEventListener("error", ({ detail }) => showError(detail));
showConnection({ state: client.state });

function showConnection({ state, delayMs }) {
  const el = $("conn-state");
  el.dataset.state = state;
  const models = client.hello?.models;
  el.textContent = {
    connecting: "Connecting to the server…",
    open: models
      ? `Connected · layout: ${models.layout} · OCR: ${models.ocr ?? "none"}`
      : "Connected",
    reconnecting: `Connection lost · retrying${delayMs ? ` in ${Math.ceil(delayMs / 1000)} s` : ""}…`,
    closed: "Disconnected",
  }[state];
}

// --- messages -----------------------------------------------------------------------------

function say(text) {
  $("message").textContent = text;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function showError(error, context) {
  const el = $("error");
  const words = plainWords(error);
  el.textContent = sentence(context ? `${context}: ${words}` : words);
  el.hidden = false;
}

const sentence = (text) => (/[.!?…]$/.test(text) ? text : `${text}.`);

function plainWords(error) {
  if (!(error instanceof RagwsError)) return error?.message || String(error);
  const detail = error.message ? ` — ${error.message}` : "";
  switch (error.code) {
    case "bad_request":
      return `the server could not use this input${detail}`;
    case "too_large":
      return `this is over one of the server's limits${detail}`;
    case "overloaded":
      return "the server is busy with other requests; try again in a moment";
    case "unsupported":
      return `the server cannot do this${detail}`;
    case "internal":
      return `the server failed while working on it${detail}`;
    case "disconnected":
      return "the connection to the server was lost, so the request stopped; it reconnects by itself, try again then";
    case "closed":
      return "the connection to the server is closed";
    default:
      return `${error.code}${detail}`;
  }
}

// --- opening a document -------------------------------------------------------------------

$("file-input").addEventListener("change", (event) => {
  openFile(event.target.files[0]);
  event.target.value = ""; // choosing the same file again opens it again
});

let dragDepth = 0;
const hasFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes("Files");
document.addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  $("drop-overlay").hidden = false;
});
document.addEventListener("dragover", (event) => {
  if (hasFiles(event)) event.preventDefault();
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) $("drop-overlay").hidden = true;
});
document.addEventListener("drop", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  openFile(event.dataTransfer.files[0]);
});

async function openFile(file) {
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  reset();
  const kind = isPdf(bytes) ? "pdf" : "image";
  const doc = { name: file.name, kind, bytes, pages: new Map(), pageCount: null, urls: [], drawn: 0 };
  view.doc = doc;
  $("dropzone").hidden = true;
  $("parse-button").disabled = false;
  $("parse-pages").disabled = kind !== "pdf";
  document.title = `${file.name} · ragws viewer`;
  if (kind === "pdf") await loadPdf(doc);
  else await loadImage(doc, file);
}

async function loadPdf(doc) {
  say(`Rendering and analysing ${doc.name}…`);
  const started = performance.now();
  const stream = client.pdf(doc.bytes, { images: true, scale: RENDER_SCALE });
  view.loading = stream;
  try {
    for await (const frame of stream) {
      if (view.loading !== stream) break; // another document was opened meanwhile
      const url = URL.createObjectURL(new Blob([frame.image], { type: "image/jpeg" }));
      doc.urls.push(url);
      const page = addPage(doc, frame.page, frame, url, frame.image);
      setRegions(page, frame);
      say(`${doc.name}: ${doc.pages.size} page${doc.pages.size === 1 ? "" : "s"} analysed…`);
    }
    const done = await stream.result;
    if (view.loading !== stream) return;
    if (done.finish_reason === "cancelled") {
      say(`${doc.name}: stopped after ${doc.pages.size} pages.`);
      return;
    }
    doc.pageCount = done.page_count;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    say(`${doc.name}: ${done.pages} of ${done.page_count} pages analysed in ${seconds} s. ` +
      "Select a region to read its text.");
  } catch (error) {
    if (view.loading === stream) {
      say(`${doc.name}: ${doc.pages.size} pages analysed before the error.`);
      showError(error, `Could not analyse ${doc.name}`);
    }
  } finally {
    if (view.loading === stream) view.loading = null;
  }
}

async function loadImage(doc, file) {
  const url = URL.createObjectURL(file);
  doc.urls.push(url);
  const size = await imageSize(url);
  if (view.doc !== doc) return; // another document was opened meanwhile
  const page = addPage(doc, 0, size, url, doc.bytes);
  doc.pageCount = 1;
  say(`Analysing ${doc.name}…`);
  const request = client.layout(doc.bytes);
  view.loading = request;
  try {
    const result = await request;
    if (view.loading !== request) return;
    resizePage(page, result);
    setRegions(page, result);
    say(`${doc.name}: analysed in ${Math.round(result.timing.total_ms)} ms. ` +
      "Select a region to read its text.");
  } catch (error) {
    if (view.loading === request && error.code !== "cancelled") {
      // Nothing to show: back to the empty state, with the reason.
      page.figure.remove();
      doc.pages.delete(0);
      $("dropzone").hidden = false;
      $("parse-button").disabled = true;
      say(`${doc.name} could not be opened.`);
      showError(error, `Could not analyse ${doc.name}`);
    }
  } finally {
    if (view.loading === request) view.loading = null;
  }
}

function imageSize(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => resolve({ width: 1, height: 1 }); // the server says what is wrong
    img.src = url;
  });
}

function reset() {
  view.loading?.cancel();
  view.ocr?.cancel();
  view.parse?.cancel();
  cancelDrag();
  drawing.page = null;
  Object.assign(view, { loading: null, ocr: null, parse: null, parsed: null });
  for (const url of view.doc?.urls ?? []) URL.revokeObjectURL(url);
  view.doc = null;
  clearError();
  for (const page of document.querySelectorAll(".page")) page.remove();
  classes.clear();
  $("legend-items").replaceChildren();
  $("legend").hidden = true;
  resetOcrPanel();
  resetParsePanel();
}

function isPdf(bytes) {
  return String.fromCharCode(...bytes.subarray(0, 5)) === "%PDF-";
}

// --- pages and regions --------------------------------------------------------------------

function addPage(doc, number, { width, height }, imageUrl, imageBytes) {
  const figure = document.createElement("figure");
  figure.className = "page";
  figure.dataset.page = String(number);
  figure.dataset.testid = "page";
  const sheet = document.createElement("div");
  sheet.className = "sheet";
  const img = document.createElement("img");
  img.src = imageUrl;
  img.alt = `Page ${number + 1} of ${doc.name}`;
  img.width = width;
  img.height = height;
  img.draggable = false; // a mouse drag on the page draws, never drags the picture away
  const overlay = document.createElement("div");
  overlay.className = "overlay";
  overlay.setAttribute("role", "group");
  overlay.setAttribute("aria-label", `Regions on page ${number + 1}`);
  overlay.dataset.testid = "overlay";
  overlay.addEventListener("keydown", moveFocus);
  // Above the page, where a person scrolling down reaches it first (on a phone the results
  // panel covers the screen's lower part).
  const caption = document.createElement("figcaption");
  const title = document.createElement("span");
  title.textContent = `Page ${number + 1}`;
  const hint = document.createElement("span");
  hint.className = "draw-hint";
  hint.textContent = "Drag over what to read · Esc stops";
  const toggle = document.createElement("button");
  toggle.type = "button";
  toggle.className = "button draw-toggle";
  toggle.textContent = "Draw region";
  toggle.dataset.testid = "draw-toggle";
  toggle.setAttribute("aria-pressed", "false");
  toggle.setAttribute("aria-label", `Draw region on page ${number + 1}: drag a rectangle to read its text`);
  caption.append(title, hint, toggle);
  sheet.append(img, overlay);
  figure.append(caption, sheet);

  // Pages finish in any order: keep them in page order on screen.
  const later = [...doc.pages.values()].filter((p) => p.number > number).sort((a, b) => a.number - b.number)[0];
  $("pages").insertBefore(figure, later ? later.figure : null);

  const page = {
    number, width, height, imageBytes, figure, sheet, img, overlay, caption: title, toggle,
    regions: [], drawn: [],
  };
  doc.pages.set(number, page);
  toggle.addEventListener("click", () => setDrawPage(drawing.page === page ? null : page));
  sheet.addEventListener("pointerdown", (event) => startDrag(page, event));
  sheet.addEventListener("pointermove", (event) => moveDrag(event));
  sheet.addEventListener("pointerup", (event) => endDrag(event));
  sheet.addEventListener("pointercancel", () => cancelDrag());
  sheet.addEventListener("lostpointercapture", () => cancelDrag());
  // After a drag the browser may still click what the drag began on: that click is no choice.
  sheet.addEventListener("click", (event) => {
    if (drawing.swallowClick) event.stopPropagation();
  }, true);
  return page;
}

function resizePage(page, { width, height }) {
  Object.assign(page, { width, height });
  page.img.width = width;
  page.img.height = height;
}

function setRegions(page, { boxes, classes: names, scores }) {
  page.regions = boxes.map((box, index) => ({ box, name: names[index], score: scores[index], index }));
  // Larger regions first, so that a region inside another is on top of it and clickable.
  const byArea = [...page.regions].sort((a, b) => area(b.box) - area(a.box));
  const buttons = byArea.map((region) => regionButton(page, region));
  // Drawn regions outlive a late layout (an image's arrives after it is shown), on top.
  page.overlay.replaceChildren(...buttons, ...page.drawn.map((region) => region.button));
  for (const region of page.regions) countClass(region.name);
  resetRoving(page.overlay);
  page.caption.textContent = `Page ${page.number + 1} · ${boxes.length} region${boxes.length === 1 ? "" : "s"}`;
}

function area([x0, y0, x1, y1]) {
  return (x1 - x0) * (y1 - y0);
}

function regionButton(page, region) {
  const [x0, y0, x1, y1] = region.box;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "region";
  button.dataset.class = region.name;
  button.dataset.index = String(region.index);
  button.dataset.box = region.box.map((v) => Math.round(v)).join(",");
  button.dataset.testid = "region";
  button.setAttribute("aria-pressed", "false");
  if (region.drawn) {
    const size = `${Math.round(x1 - x0)} × ${Math.round(y1 - y0)} pixels`;
    button.setAttribute("aria-label", `region drawn on page ${page.number + 1}, ${size}; read its text`);
    button.title = `drawn region, ${size}`;
  } else {
    button.setAttribute("aria-label", `${region.name} region, score ${region.score.toFixed(2)}; read its text`);
    button.title = `${region.name} ${region.score.toFixed(2)}`;
  }
  const color = classInfo(region.name).color;
  button.style.setProperty("--c", color);
  Object.assign(button.style, {
    left: pct(x0, page.width),
    top: pct(y0, page.height),
    width: pct(x1 - x0, page.width),
    height: pct(y1 - y0, page.height),
  });
  button.hidden = !classInfo(region.name).visible;
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = region.name;
  button.append(tag);
  button.addEventListener("click", () => readRegion(page, region, button));
  region.button = button;
  return button;
}

const pct = (value, total) => `${((100 * value) / total).toFixed(3)}%`;

// One tab stop per page; arrow keys move between its regions, in reading order.
function resetRoving(overlay) {
  const buttons = visibleRegions(overlay);
  for (const button of overlay.querySelectorAll(".region")) button.tabIndex = -1;
  if (buttons.length) buttons[0].tabIndex = 0;
}

function visibleRegions(overlay) {
  // Top to bottom, then left to right.
  const corner = (button) => button.dataset.box.split(",").map(Number);
  return [...overlay.querySelectorAll(".region:not([hidden])")].sort((a, b) => {
    const [ax, ay] = corner(a);
    const [bx, by] = corner(b);
    return ay - by || ax - bx;
  });
}

function moveFocus(event) {
  const keys = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, Home: -Infinity, End: Infinity };
  if (!(event.key in keys) || !event.target.classList.contains("region")) return;
  event.preventDefault();
  const buttons = visibleRegions(event.currentTarget);
  const at = buttons.indexOf(event.target);
  const step = keys[event.key];
  const next = Number.isFinite(step)
    ? buttons[(at + step + buttons.length) % buttons.length]
    : buttons[step < 0 ? 0 : buttons.length - 1];
  event.target.tabIndex = -1;
  next.tabIndex = 0;
  next.focus();
}

// --- drawing a region ---------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (drawing.drag) cancelDrag();
  else if (drawing.page) setDrawPage(null);
  else return;
  event.preventDefault();
});

/** Put one page in draw mode (null: none). The mode stays until toggled off or Escape. */
function setDrawPage(page) {
  cancelDrag();
  drawing.page = page;
  for (const other of view.doc?.pages.values() ?? []) {
    other.figure.classList.toggle("drawing", other === page);
    other.toggle.setAttribute("aria-pressed", String(other === page));
  }
}

function startDrag(page, event) {
  const mode = drawing.page === page || (event.shiftKey && event.pointerType === "mouse");
  if (!mode || drawing.drag || !event.isPrimary || event.button !== 0) return;
  event.preventDefault(); // no text selection, no native drag
  const { x, y } = pagePoint(page, event);
  const el = document.createElement("div");
  el.className = "draw-box";
  el.dataset.testid = "draw-box";
  page.overlay.append(el);
  drawing.drag = { page, pointerId: event.pointerId, x0: x, y0: y, x1: x, y1: y, el };
  placeBox(page, el, dragBox(drawing.drag));
  page.sheet.setPointerCapture(event.pointerId);
}

function moveDrag(event) {
  const drag = drawing.drag;
  if (!drag || event.pointerId !== drag.pointerId) return;
  const at = pagePoint(drag.page, event);
  drag.x1 = at.x;
  drag.y1 = at.y;
  placeBox(drag.page, drag.el, dragBox(drag));
}

function endDrag(event) {
  const drag = drawing.drag;
  if (!drag || event.pointerId !== drag.pointerId) return;
  moveDrag(event);
  cancelDrag();
  const { page } = drag;
  const box = dragBox(drag);
  const onScreen = page.img.getBoundingClientRect().width / page.width;
  if ((box[2] - box[0]) * onScreen < DRAW_MIN_PX || (box[3] - box[1]) * onScreen < DRAW_MIN_PX) return;
  drawing.swallowClick = true;
  setTimeout(() => (drawing.swallowClick = false), 0); // the click, if any, comes before this
  addDrawnRegion(page, box);
}

function cancelDrag() {
  const drag = drawing.drag;
  if (!drag) return;
  drawing.drag = null;
  drag.el.remove();
  if (drag.page.sheet.hasPointerCapture(drag.pointerId)) drag.page.sheet.releasePointerCapture(drag.pointerId);
}

/** Where a pointer is, in the page image's pixels, held to the page. */
function pagePoint(page, { clientX, clientY }) {
  const rect = page.img.getBoundingClientRect();
  const clamp = (value) => Math.min(1, Math.max(0, value));
  return {
    x: clamp((clientX - rect.left) / rect.width) * page.width,
    y: clamp((clientY - rect.top) / rect.height) * page.height,
  };
}

/** The drag as a box of whole pixels, [x0, y0, x1, y1], within the page. */
function dragBox({ page, x0, y0, x1, y1 }) {
  const left = Math.max(0, Math.floor(Math.min(x0, x1)));
  const top = Math.max(0, Math.floor(Math.min(y0, y1)));
  const right = Math.min(page.width, Math.ceil(Math.max(x0, x1)));
  const bottom = Math.min(page.height, Math.ceil(Math.max(y0, y1)));
  return [left, top, right, bottom];
}

function placeBox(page, el, [x0, y0, x1, y1]) {
  Object.assign(el.style, {
    left: pct(x0, page.width),
    top: pct(y0, page.height),
    width: pct(x1 - x0, page.width),
    height: pct(y1 - y0, page.height),
  });
}

/** A drawn rectangle becomes a region of its page, like the layout's, and is read at once. */
function addDrawnRegion(page, box) {
  const info = classInfo(DRAWN);
  if (!info.visible) {
    info.checkbox.checked = true;
    toggleClass(DRAWN, true);
  }
  view.doc.drawn += 1;
  const region = { box, name: DRAWN, score: 1, index: `${DRAWN}-${view.doc.drawn}`, drawn: true };
  page.drawn.push(region);
  const button = regionButton(page, region);
  button.tabIndex = -1;
  page.overlay.append(button);
  countClass(DRAWN);
  if (!page.overlay.querySelector('.region[tabindex="0"]')) resetRoving(page.overlay);
  readRegion(page, region, button);
}

// --- legend -------------------------------------------------------------------------------

function classInfo(name) {
  let info = classes.get(name);
  if (!info) {
    const spare = SPARE_COLORS[classes.size % SPARE_COLORS.length];
    info = { color: CLASS_COLORS[name] ?? spare, visible: true, count: 0 };
    classes.set(name, info);
    info.countEl = addLegendItem(name, info);
  }
  return info;
}

function countClass(name) {
  const info = classInfo(name);
  info.count += 1;
  info.countEl.textContent = String(info.count);
}

function addLegendItem(name, info) {
  const label = document.createElement("label");
  label.className = "legend-item";
  label.dataset.testid = "legend-item";
  label.dataset.class = name;
  label.style.setProperty("--c", info.color);
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = info.visible;
  box.addEventListener("change", () => toggleClass(name, box.checked));
  info.checkbox = box;
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  const text = document.createElement("span");
  text.className = "name";
  text.textContent = name;
  const count = document.createElement("span");
  count.className = "count";
  count.setAttribute("aria-label", "regions");
  label.append(box, swatch, text, count);
  // Keep the legend in a stable, alphabetical order.
  const items = [...$("legend-items").children];
  const after = items.find((item) => item.dataset.class > name);
  $("legend-items").insertBefore(label, after ?? null);
  $("legend").hidden = false;
  return count;
}

function toggleClass(name, visible) {
  classes.get(name).visible = visible;
  for (const button of document.querySelectorAll(".region")) {
    if (button.dataset.class === name) button.hidden = !visible;
  }
  for (const overlay of document.querySelectorAll(".overlay")) resetRoving(overlay);
}

// --- OCR of a region ----------------------------------------------------------------------

$("ocr-stop").addEventListener("click", () => {
  if (view.ocr?.cancel()) setStatus("ocr-status", "running", "Stopping…");
});

function resetOcrPanel() {
  $("ocr-region").textContent = "Select a region on a page to read its text.";
  $("ocr-text").replaceChildren();
  $("ocr-crop").hidden = true;
  $("ocr-stop").hidden = true;
  setStatus("ocr-status", "idle", "");
}

async function readRegion(page, region, button) {
  view.ocr?.cancel();
  for (const pressed of document.querySelectorAll('.region[aria-pressed="true"]')) {
    pressed.setAttribute("aria-pressed", "false");
  }
  for (const mark of document.querySelectorAll(".ocr-line")) mark.remove();
  button.setAttribute("aria-pressed", "true");
  selectTab("ocr");
  clearError();

  const what = region.drawn ? "drawn region" : region.name;
  $("ocr-region").textContent = `${what} on page ${page.number + 1}`;
  drawCrop(page, region.box);
  const out = $("ocr-text");
  out.replaceChildren();
  $("ocr-stop").hidden = false;
  setStatus("ocr-status", "running", "Reading…");
  if (matchMedia("(max-width: 860px)").matches) $("panel").scrollIntoView({ block: "nearest" });

  const started = performance.now();
  const stream = client.ocr(page.imageBytes, { box: region.box });
  view.ocr = stream;
  let lines = 0;
  try {
    for await (const token of stream) {
      if (view.ocr !== stream) break; // another region was selected meanwhile
      out.append(token.text);
      lines += 1;
      if (token.box) markLine(page, token.box);
      setStatus("ocr-status", "running", `Reading… ${lines} line${lines === 1 ? "" : "s"}`);
    }
    const done = await stream.result;
    if (view.ocr !== stream) return;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (done.finish_reason === "cancelled") {
      setStatus("ocr-status", "stopped", `Stopped after ${lines} line${lines === 1 ? "" : "s"}.`);
    } else if (!done.text) {
      setStatus("ocr-status", "done", "No text found in this region.");
    } else {
      setStatus("ocr-status", "done", `Done: ${lines} line${lines === 1 ? "" : "s"} in ${seconds} s.`);
    }
  } catch (error) {
    if (view.ocr === stream) {
      setStatus("ocr-status", "error", sentence(`Stopped by an error: ${plainWords(error)}`));
      showError(error, "Could not read the region");
    }
  } finally {
    if (view.ocr === stream) {
      view.ocr = null;
      $("ocr-stop").hidden = true;
    }
  }
}

function drawCrop(page, [x0, y0, x1, y1]) {
  const canvas = $("ocr-crop");
  const width = Math.max(1, x1 - x0);
  const height = Math.max(1, y1 - y0);
  const scale = Math.min(1, 900 / width, 300 / height);
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const draw = () =>
    canvas.getContext("2d").drawImage(page.img, x0, y0, width, height, 0, 0, canvas.width, canvas.height);
  if (page.img.complete) draw();
  else page.img.addEventListener("load", draw, { once: true });
  canvas.hidden = false;
}

function markLine(page, [x0, y0, x1, y1]) {
  const mark = document.createElement("div");
  mark.className = "ocr-line";
  Object.assign(mark.style, {
    left: pct(x0, page.width),
    top: pct(y0, page.height),
    width: pct(x1 - x0, page.width),
    height: pct(y1 - y0, page.height),
  });
  page.overlay.append(mark);
}

// --- parse --------------------------------------------------------------------------------

$("parse-button").addEventListener("click", () => parseDocument());
$("parse-pages").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !$("parse-button").disabled) parseDocument();
});
$("parse-stop").addEventListener("click", () => {
  if (view.parse?.cancel()) setStatus("parse-status", "running", "Stopping…");
});
const VIEWS = ["rendered", "blocks", "raw"];
for (const which of VIEWS) $(`view-${which}`).addEventListener("click", () => showMarkdownView(which));
$("download-md").addEventListener("click", () => {
  const { name, done } = view.parsed;
  download(`${baseName(name)}.md`, done.markdown, "text/markdown");
});
$("download-json").addEventListener("click", () => {
  const { name, pages, done } = view.parsed;
  const body = {
    source: name,
    page_count: done.page_count,
    pages,
    markdown: done.markdown,
    chunks: done.chunks,
    timing: done.timing,
  };
  download(`${baseName(name)}.json`, JSON.stringify(body, null, 2), "application/json");
});

function resetParsePanel() {
  setStatus("parse-status", "idle", "Parse the document to get its markdown and RAG chunks.");
  $("parse-progress").hidden = true;
  $("parse-page-list").replaceChildren();
  $("parse-result").hidden = true;
  $("block-pages").replaceChildren();
  $("block-legend").replaceChildren();
  $("parse-stop").hidden = true;
  $("parse-button").disabled = true;
  $("parse-pages").disabled = false;
}

async function parseDocument() {
  const doc = view.doc;
  if (!doc) return;
  let pages = null;
  try {
    pages = doc.kind === "pdf" ? pageSelection($("parse-pages").value, doc.pageCount) : null;
  } catch (error) {
    selectTab("parse");
    setStatus("parse-status", "error", error.message);
    $("parse-pages").focus();
    return;
  }
  view.parse?.cancel();
  clearError();
  selectTab("parse");

  const expected = pages ?? (doc.pageCount ? [...Array(doc.pageCount).keys()] : null);
  const chips = new Map();
  $("parse-page-list").replaceChildren(
    ...(expected ?? []).map((number) => {
      const chip = document.createElement("li");
      chip.textContent = `p. ${number + 1}`;
      chip.dataset.state = "pending";
      chips.set(number, chip);
      return chip;
    }),
  );
  const progress = $("parse-progress");
  progress.hidden = false;
  if (expected) {
    progress.max = expected.length;
    progress.value = 0;
  } else {
    progress.removeAttribute("value"); // indeterminate until the count is known
  }
  $("parse-result").hidden = true;
  $("parse-stop").hidden = false;
  setStatus("parse-status", "running", "Parsing…");

  const stream = client.parse(doc.bytes, pages ? { pages } : {});
  view.parse = stream;
  const frames = [];
  try {
    for await (const frame of stream) {
      if (view.parse !== stream) break; // another document was opened meanwhile
      frames.push(frame);
      chips.get(frame.page)?.setAttribute("data-state", "done");
      if (expected) progress.value = frames.length;
      const total = expected ? ` of ${expected.length}` : "";
      setStatus("parse-status", "running", `Parsing… ${frames.length}${total} pages done`);
    }
    const done = await stream.result;
    if (view.parse !== stream) return;
    if (done.finish_reason === "cancelled") {
      setStatus("parse-status", "stopped", `Stopped after ${frames.length} pages.`);
      return;
    }
    progress.max = done.pages;
    progress.value = done.pages;
    frames.sort((a, b) => a.page - b.page);
    const pagesOut = frames.map(({ type, id, ...page }) => page);
    view.parsed = { name: doc.name, pages: pagesOut, done };
    showParsed(done);
  } catch (error) {
    if (view.parse === stream) {
      setStatus("parse-status", "error", sentence(`Parsing stopped: ${plainWords(error)}`));
      showError(error, "Could not parse the document");
    }
  } finally {
    if (view.parse === stream) {
      view.parse = null;
      $("parse-stop").hidden = true;
    }
  }
}

function showParsed(done) {
  const seconds = (done.timing.total_ms / 1000).toFixed(1);
  setStatus("parse-status", "done", `Parsed ${done.pages} page${done.pages === 1 ? "" : "s"} in ${seconds} s.`);
  $("parse-summary").textContent =
    `${done.markdown.length.toLocaleString()} characters of markdown · ${done.chunks.length} chunk${done.chunks.length === 1 ? "" : "s"}`;
  $("markdown-rendered").replaceChildren(renderMarkdown(done.markdown));
  $("markdown-raw").textContent = done.markdown;
  showBlocks(view.parsed.pages);
  $("parse-result").hidden = false;
}

// --- parsed blocks ------------------------------------------------------------------------

const blockTypes = new Map(); // type → {color, visible, count, countEl}

/** Each page's blocks in reading order, each drawn as its type says, with a legend of types. */
function showBlocks(pages) {
  blockTypes.clear();
  $("block-legend").replaceChildren();
  const sections = pages.map((page) => {
    const section = document.createElement("section");
    section.className = "block-page";
    const heading = document.createElement("h3");
    heading.textContent = `Page ${page.page + 1}`;
    const list = document.createElement("ol");
    list.className = "block-list";
    const blocks = [...(page.blocks ?? [])].sort((a, b) => (a.order ?? 0) - (b.order ?? 0));
    list.append(...blocks.map((block, k) => blockCard(page, block, k)));
    section.append(heading, list);
    return section;
  });
  $("block-pages").replaceChildren(...sections);
}

function blockCard(page, block, index) {
  const type = String(block.type ?? "text");
  const info = blockType(type);
  info.count += 1;
  info.countEl.textContent = String(info.count);
  const card = document.createElement("li");
  card.className = "block";
  card.dataset.type = type;
  card.dataset.testid = "block";
  card.style.setProperty("--c", info.color);
  card.hidden = !info.visible;
  const head = document.createElement("button");
  head.type = "button";
  head.className = "block-head";
  const level = type === "title" || type === "heading" ? ` · level ${headingLevel(block)}` : "";
  const tag = document.createElement("span");
  tag.className = "block-type";
  tag.textContent = `${type}${level}`;
  const where = document.createElement("span");
  where.className = "muted";
  where.textContent = `p. ${page.page + 1} · ${block.source ?? "none"}`;
  head.append(tag, where);
  const name = `${type}${level}, block ${index + 1} of page ${page.page + 1}`;
  head.setAttribute("aria-label", `${name}: show it on the page`);
  head.addEventListener("click", () => markBlock(page, block));
  const body = document.createElement("div");
  body.className = "block-body markdown";
  body.append(renderBlock(block));
  card.append(head, body);
  return card;
}

function blockType(name) {
  let info = blockTypes.get(name);
  if (info) return info;
  const spare = SPARE_COLORS[blockTypes.size % SPARE_COLORS.length];
  info = { color: CLASS_COLORS[name] ?? spare, visible: true, count: 0 };
  blockTypes.set(name, info);
  const label = document.createElement("label");
  label.className = "legend-item";
  label.dataset.testid = "block-legend-item";
  label.dataset.class = name;
  label.style.setProperty("--c", info.color);
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = true;
  box.addEventListener("change", () => {
    info.visible = box.checked;
    for (const card of document.querySelectorAll(".block")) {
      if (card.dataset.type === name) card.hidden = !box.checked;
    }
  });
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  const text = document.createElement("span");
  text.className = "name";
  text.textContent = name;
  info.countEl = document.createElement("span");
  info.countEl.className = "count";
  info.countEl.setAttribute("aria-label", "blocks");
  label.append(box, swatch, text, info.countEl);
  // The parse's types in their fixed order, then any others alphabetically.
  const rank = (type) => {
    const at = BLOCK_TYPES.indexOf(type);
    return at < 0 ? `1${type}` : `0${String(at).padStart(2, "0")}`;
  };
  const after = [...$("block-legend").children].find((item) => rank(item.dataset.class) > rank(name));
  $("block-legend").insertBefore(label, after ?? null);
  return info;
}

/** Outline a block on its page, and bring the page into view. */
function markBlock(parsed, block) {
  for (const mark of document.querySelectorAll(".block-mark")) mark.remove();
  const page = view.doc?.pages.get(parsed.page);
  if (!page || !block.bbox) return;
  const [x0, y0, x1, y1] = block.bbox;
  const mark = document.createElement("div");
  mark.className = "block-mark";
  mark.style.setProperty("--c", blockType(String(block.type ?? "text")).color);
  Object.assign(mark.style, {
    left: pct(x0, parsed.width),
    top: pct(y0, parsed.height),
    width: pct(x1 - x0, parsed.width),
    height: pct(y1 - y0, parsed.height),
  });
  page.overlay.append(mark);
  mark.scrollIntoView({ block: "center", behavior: "smooth" });
}

/** "1-3, 5" → [0, 1, 2, 4]; empty → null (every page). */
function pageSelection(text, pageCount) {
  const spec = text.trim();
  if (!spec) return null;
  const pages = new Set();
  for (const part of spec.split(/[\s,;]+/).filter(Boolean)) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!match) throw new Error(`Pages: “${part}” is not a page number or a range like 1-3.`);
    const first = Number(match[1]);
    const last = Number(match[2] ?? match[1]);
    if (first < 1 || last < first) throw new Error(`Pages: “${part}” is not a valid range.`);
    if (pageCount && last > pageCount) {
      throw new Error(`Pages: the document has ${pageCount} page${pageCount === 1 ? "" : "s"}.`);
    }
    for (let page = first; page <= last; page++) pages.add(page - 1);
  }
  return [...pages].sort((a, b) => a - b);
}

function showMarkdownView(which) {
  for (const other of VIEWS) $(`view-${other}`).setAttribute("aria-pressed", String(which === other));
  $("markdown-rendered").hidden = which !== "rendered";
  $("blocks-view").hidden = which !== "blocks";
  $("markdown-raw").hidden = which !== "raw";
}

function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

const baseName = (name) => name.replace(/\.[^.]+$/, "") || "document";

// --- panel tabs and status lines ----------------------------------------------------------

const TABS = ["ocr", "parse"];
for (const name of TABS) {
  $(`tab-${name}`).addEventListener("click", () => selectTab(name));
  $(`tab-${name}`).addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = TABS[(TABS.indexOf(name) + step + TABS.length) % TABS.length];
    selectTab(next);
    $(`tab-${next}`).focus();
  });
}

function selectTab(name) {
  for (const other of TABS) {
    const selected = other === name;
    $(`tab-${other}`).setAttribute("aria-selected", String(selected));
    $(`tab-${other}`).tabIndex = selected ? 0 : -1;
    $(`panel-${other}`).hidden = !selected;
  }
}

function setStatus(id, state, text) {
  const el = $(id);
  el.dataset.state = state;
  el.textContent = text;
}
