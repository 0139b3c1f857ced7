// markdown.js — a small renderer for the markdown ragws's `parse` writes: headings,
// paragraphs, lists, `$$` blocks and fenced code as preformatted text, pipe tables, and the
// figure placeholders `![figure](#page-N-figure-K)`. Every string reaches the page as text
// (textContent), never as HTML, so a document cannot inject markup.

const HEADING = /^(#{1,6})\s+(.*)$/;
const IMAGE = /^!\[([^\]]*)\]\(([^)\s]*)\)$/;
const FIGURE_ANCHOR = /^#page-(\d+)-figure-(\d+)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

/** Render markdown into a DocumentFragment. */
export function renderMarkdown(markdown, doc = document) {
  const out = doc.createDocumentFragment();
  const el = (tag, text, className) => {
    const node = doc.createElement(tag);
    if (text != null) node.textContent = text;
    if (className) node.className = className;
    return node;
  };
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.append(block(paragraph, el, doc));
    paragraph = [];
  };

  const lines = String(markdown ?? "").replace(/\r\n?/g, "\n").split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const trimmed = line.trim();
    if (!trimmed) {
      flush();
      continue;
    }
    const fence = trimmed.startsWith("```") ? "```" : trimmed === "$$" ? "$$" : null;
    if (fence) {
      // A display block, up to its closing fence (or the end of the text).
      flush();
      const body = [];
      for (i += 1; i < lines.length && lines[i].trim() !== fence; i++) body.push(lines[i]);
      out.append(el("pre", body.join("\n"), fence === "$$" ? "md-math" : "md-code"));
      continue;
    }
    if (trimmed.length > 4 && trimmed.startsWith("$$") && trimmed.endsWith("$$")) {
      flush();
      out.append(el("pre", trimmed.slice(2, -2).trim(), "md-math"));
      continue;
    }
    const heading = HEADING.exec(trimmed);
    if (heading) {
      flush();
      out.append(el(`h${heading[1].length}`, heading[2].replace(/\s+#+$/, "")));
      continue;
    }
    const image = IMAGE.exec(trimmed);
    if (image) {
      flush();
      out.append(figure(image[1], image[2], el));
      continue;
    }
    paragraph.push(line);
  }
  flush();
  return out;
}

function figure(alt, target, el) {
  const anchor = FIGURE_ANCHOR.exec(target);
  const words = anchor ? `Figure ${anchor[2]} on page ${anchor[1]}` : alt || "Image";
  const node = el("div", null, "md-figure");
  node.setAttribute("role", "img");
  node.setAttribute("aria-label", words);
  node.append(el("span", words));
  return node;
}

function block(lines, el, doc) {
  if (lines.every((line) => line.trim().startsWith("|"))) return table(lines, el, doc);
  if (lines[0].trim().startsWith("<")) return el("pre", lines.join("\n"), "md-code"); // markup
  for (const [pattern, tag] of [
    [BULLET, "ul"],
    [NUMBERED, "ol"],
  ]) {
    if (lines.every((line) => pattern.test(line))) {
      const list = el(tag);
      for (const line of lines) list.append(el("li", pattern.exec(line)[1]));
      return list;
    }
  }
  // Line breaks inside a block are kept (ragws keeps them for lists and plain tables).
  const p = el("p");
  lines.forEach((line, k) => {
    if (k) p.append(doc.createElement("br"));
    p.append(line.trim());
  });
  return p;
}

function table(lines, el, doc) {
  const cells = (line) =>
    line
      .trim()
      .replace(/^\|/, "")
      .replace(/\|$/, "")
      .split("|")
      .map((cell) => cell.trim());
  if (lines.length < 2 || !TABLE_RULE.test(lines[1])) {
    return el("pre", lines.join("\n"), "md-code");
  }
  const node = el("table", null, "md-table");
  const head = node.createTHead().insertRow();
  for (const cell of cells(lines[0])) head.append(el("th", cell));
  const body = node.createTBody();
  for (const line of lines.slice(2)) {
    const row = body.insertRow();
    for (const cell of cells(line)) row.insertCell().textContent = cell;
  }
  const wrap = doc.createElement("div");
  wrap.className = "md-table-wrap";
  wrap.append(node);
  return wrap;
}
