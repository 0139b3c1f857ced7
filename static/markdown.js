// markdown.js — a small renderer for the markdown ragws's `parse` writes: headings,
// paragraphs, nested lists, `$$` blocks, fenced code, pipe tables, the HTML tables written for
// tables with merged cells, and the figure placeholders `![figure](#page-N-figure-K)`.
// Every string reaches the page as text (textContent), never as HTML, so a document cannot
// inject markup: an HTML table is read by an inert parser and rebuilt from its cells' text and
// their integer spans, and nothing else of it survives.

const HEADING = /^(#{1,6})(?:\s+(.*))?$/;
const IMAGE = /^!\[([^\]]*)\]\(([^)\s]*)\)$/;
const FIGURE_ANCHOR = /^#page-(\d+)-figure-(\d+)$/;
const FENCE = /^(\s*)(`{3,}|~{3,})(.*)$/;
// A list item: its indentation, its marker ("-", "*", "+", "1.", "1)") and its text.
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])(?:\s+(.*)|\s*$)/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
// A pipe table's column alignment, from the first and last characters of its rule cell.
const ALIGN = { "::": "center", "-:": "right", ":-": "left", "--": "" };
const HTML_TABLE = /^<table[\s>]/i;
const TABLE_END = /<\/table\s*>/i;
// Browsers cap spans at these (HTML's own limits); larger values would only cost layout time.
const MAX_COLSPAN = 1000;
const MAX_ROWSPAN = 65534;

/** Render markdown into a DocumentFragment. */
export function renderMarkdown(markdown, doc = document) {
  const out = doc.createDocumentFragment();
  const el = maker(doc);
  const lines = String(markdown ?? "").replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.append(block(paragraph, el, doc));
    paragraph = [];
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const trimmed = line.trim();
    if (!trimmed) {
      flush();
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence && !(fence[2][0] === "`" && fence[3].includes("`"))) {
      // Fenced code, up to a closing fence at least as long (or the end of the text); its
      // lines keep their breaks and indentation, less the opening fence's own indentation.
      flush();
      const [, indent, marks] = fence;
      const close = new RegExp(`^\\s*${marks[0] === "`" ? "`" : "~"}{${marks.length},}\\s*$`);
      const body = [];
      for (i += 1; i < lines.length && !close.test(lines[i]); i++) {
        body.push(lines[i].replace(new RegExp(`^ {0,${indent.length}}`), ""));
      }
      out.append(code(body.join("\n"), "md-code", el));
      continue;
    }
    if (trimmed === "$$") {
      flush();
      const body = [];
      for (i += 1; i < lines.length && lines[i].trim() !== "$$"; i++) body.push(lines[i]);
      out.append(el("pre", body.join("\n"), "md-math"));
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
      out.append(el(`h${heading[1].length}`, (heading[2] ?? "").replace(/\s+#+$/, "")));
      continue;
    }
    const image = IMAGE.exec(trimmed);
    if (image) {
      flush();
      out.append(figure(image[1], image[2], el));
      continue;
    }
    if (HTML_TABLE.test(trimmed)) {
      // The table's markup, up to its end tag (or a blank line), read as data.
      flush();
      const markup = [line];
      while (!TABLE_END.test(markup.at(-1)) && i + 1 < lines.length && lines[i + 1].trim()) {
        markup.push(lines[++i]);
      }
      out.append(htmlTable(markup.join("\n"), doc) ?? code(markup.join("\n"), "md-code", el));
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && isTableRule(line, lines[i + 1])) {
      flush();
      const rows = [line, lines[i + 1]];
      for (i += 2; i < lines.length && lines[i].trim() && lines[i].includes("|"); i++) {
        rows.push(lines[i]);
      }
      i -= 1;
      out.append(pipeTable(rows, el, doc));
      continue;
    }
    const item = ITEM.exec(line);
    // A numbered line interrupts a paragraph only as "1." (a sentence may start "2019. ...").
    if (item && !(paragraph.length && /^\d/.test(item[2]) && parseInt(item[2], 10) !== 1)) {
      flush();
      const items = [];
      for (; i < lines.length && lines[i].trim(); i++) {
        const next = ITEM.exec(lines[i]);
        if (next) {
          const [, indent, marker, text] = next;
          items.push({ level: indent.replace(/\t/g, "    ").length, marker, text: text ?? "" });
        } else if (/^\s/.test(lines[i])) {
          items.at(-1).text += `\n${lines[i].trim()}`; // an indented continuation line
        } else {
          break;
        }
      }
      i -= 1;
      out.append(renderList(items, doc));
      continue;
    }
    paragraph.push(line);
  }
  flush();
  return out;
}

/**
 * The body of one block of a parse `page` frame, by its type: a heading at its `level`, a
 * list from its `items`, code as preformatted text, a table from its `cells` (else its `html`,
 * rebuilt as above), an equation as a preformatted block; anything else (and a block from an
 * older server, without these fields) as its text with its line breaks.
 */
export function renderBlock(block, doc = document) {
  const el = maker(doc);
  const text = String(block?.text ?? "");
  const out = doc.createDocumentFragment();
  switch (block?.type) {
    case "title":
    case "heading":
      out.append(el(`h${headingLevel(block)}`, text));
      break;
    case "list":
      out.append(
        block.items?.length
          ? renderList(block.items, doc)
          : renderMarkdown(block.markdown || text, doc),
      );
      break;
    case "code":
      out.append(code(text, "md-code", el));
      break;
    case "table":
      out.append(
        tableFromCells(block.cells, doc) ??
          (block.html ? htmlTable(block.html, doc) : null) ??
          code(text, "md-code", el),
      );
      break;
    case "equation":
      out.append(el("pre", text, "md-math"));
      break;
    case "figure": {
      const node = el("div", null, "md-figure");
      node.append(el("span", "Figure"));
      out.append(node);
      if (text) out.append(el("p", text, "md-text"));
      break;
    }
    default:
      if (text) out.append(el("p", text, "md-text"));
  }
  return out;
}

/** A title's or heading's level: 1 for a title, `level` (2..6) for a heading. */
export function headingLevel(block) {
  const level = count(block?.level, 1) ?? (block?.type === "title" ? 1 : 2);
  return Math.min(level, 6);
}

/**
 * A table from the `cells` of a parse `table` block ({row, col, row_span, col_span, text},
 * 0-based), its first row as the header. Returns a `.md-table-wrap` div, or null when there
 * are no usable cells.
 */
export function tableFromCells(cells, doc = document) {
  const rows = new Map();
  const seen = new Set();
  for (const cell of cells ?? []) {
    const row = count(cell?.row, 0);
    const col = count(cell?.col, 0);
    if (row == null || col == null || seen.has(`${row},${col}`)) continue;
    seen.add(`${row},${col}`);
    if (!rows.has(row)) rows.set(row, []);
    rows.get(row).push({ ...cell, row, col });
  }
  if (!rows.size) return null;
  const el = maker(doc);
  const table = el("table", null, "md-table");
  // The first row is the header, with the rows its merged cells reach into (a span cannot
  // cross from <thead> into <tbody>).
  const order = [...rows.keys()].sort((a, b) => a - b);
  const spans = (rows.get(0) ?? []).map((cell) => count(cell.row_span, 1) ?? 1);
  const headRows = rows.has(0) ? Math.max(1, ...spans) : 0;
  let body = null;
  for (const row of order) {
    const header = row < headRows;
    const section = header ? table.createTHead() : (body ??= table.createTBody());
    const tr = section.insertRow();
    for (const cell of rows.get(row).sort((a, b) => a.col - b.col)) {
      const td = el(header ? "th" : "td", String(cell.text ?? ""));
      setSpans(td, cell.row_span, cell.col_span);
      tr.append(td);
    }
  }
  return wrap(table, doc);
}

/**
 * A `<table>` from HTML table markup, rebuilt from scratch: only table, thead, tbody, tr, th
 * and td elements, each cell's text as text and its rowspan/colspan as integers. No other
 * element, attribute or URL of the markup reaches the page. Returns a `.md-table-wrap` div,
 * or null when the markup holds no table.
 */
export function htmlTable(markup, doc = document) {
  // DOMParser's documents are inert: no script runs, no image or style loads.
  const source = new DOMParser().parseFromString(String(markup ?? ""), "text/html");
  const original = source.querySelector("table");
  if (!original) return null;
  const el = maker(doc);
  const table = el("table", null, "md-table");
  const copyRows = (from, to) => {
    for (const tr of from.children) {
      if (tr.tagName !== "TR") continue;
      const row = doc.createElement("tr");
      for (const cell of tr.children) {
        if (cell.tagName !== "TD" && cell.tagName !== "TH") continue;
        const out = el(cell.tagName.toLowerCase(), cellText(cell).trim());
        setSpans(out, cell.getAttribute("rowspan"), cell.getAttribute("colspan"));
        row.append(out);
      }
      to.append(row);
    }
  };
  for (const part of original.children) {
    if (part.tagName === "THEAD") copyRows(part, table.createTHead());
    else if (part.tagName === "TBODY" || part.tagName === "TFOOT") {
      copyRows(part, table.appendChild(doc.createElement("tbody")));
    }
  }
  return table.rows.length ? wrap(table, doc) : null;
}

function maker(doc) {
  return (tag, text, className) => {
    const node = doc.createElement(tag);
    if (text != null) node.textContent = text;
    if (className) node.className = className;
    return node;
  };
}

function code(text, className, el) {
  const pre = el("pre", null, className);
  pre.append(el("code", text));
  return pre;
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
  // Markup that is not a table, or rows of pipes without a rule line: shown as it is.
  if (lines.every((line) => line.trim().startsWith("|")) || lines[0].trim().startsWith("<")) {
    return code(lines.join("\n"), "md-code", el);
  }
  // Line breaks inside a paragraph are kept.
  const p = el("p");
  lines.forEach((line, k) => {
    if (k) p.append(doc.createElement("br"));
    p.append(line.trim());
  });
  return p;
}

/**
 * Nested lists, as a DocumentFragment, from items {level, marker, text} (a parse `list`
 * block's `items`, or a markdown list's lines with their indentation as level): an item deeper
 * than the one before opens a list inside it; "-", "*", "+" make a <ul>, "1." or "1)" an <ol>.
 */
export function renderList(items, doc = document) {
  const el = maker(doc);
  const out = doc.createDocumentFragment();
  const stack = []; // {level, tag, list, item}: the open lists, outermost first
  const open = (tag, marker, parent) => {
    const node = el(tag);
    const start = parseInt(marker, 10);
    if (tag === "ol" && Number.isInteger(start) && start !== 1) node.start = start;
    parent.append(node);
    return node;
  };
  for (const { level, marker, text } of items) {
    const tag = /^\d/.test(String(marker ?? "-")) ? "ol" : "ul";
    const depth = Number.isFinite(level) ? level : 0;
    while (stack.length > 1 && depth < stack.at(-1).level) stack.pop();
    let top = stack.at(-1);
    if (top && depth > top.level) {
      const node = open(tag, marker, top.item);
      stack.push((top = { level: depth, tag, list: node, item: null }));
    } else if (!top || top.tag !== tag) {
      // A new list at this level: the first one, or one of another kind.
      const parent = stack.length > 1 ? stack.at(-2).item : out;
      const node = open(tag, marker, parent);
      const entry = { level: top ? top.level : depth, tag, list: node, item: null };
      if (top) stack[stack.length - 1] = entry;
      else stack.push(entry);
      top = entry;
    }
    top.item = el("li", String(text ?? ""));
    top.list.append(top.item);
  }
  return out;
}

function isTableRule(header, rule) {
  if (!TABLE_RULE.test(rule) || !rule.includes("-")) return false;
  return splitRow(header).length === splitRow(rule).length;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function pipeTable(lines, el, doc) {
  const align = splitRow(lines[1]).map((rule) => ALIGN[`${rule.at(0)}${rule.at(-1)}`] ?? "");
  const cells = (line) => {
    const row = splitRow(line).slice(0, align.length);
    while (row.length < align.length) row.push("");
    return row;
  };
  const node = el("table", null, "md-table");
  const fill = (tr, tag, line) => {
    cells(line).forEach((text, k) => {
      const cell = el(tag, text);
      if (align[k]) cell.style.textAlign = align[k];
      tr.append(cell);
    });
  };
  fill(node.createTHead().insertRow(), "th", lines[0]);
  const body = node.createTBody();
  for (const line of lines.slice(2)) fill(body.insertRow(), "td", line);
  return wrap(node, doc);
}

function wrap(table, doc) {
  const div = doc.createElement("div");
  div.className = "md-table-wrap";
  div.append(table);
  return div;
}

/** A cell's text: its text nodes, <br> as a line break, without script or style contents. */
function cellText(node) {
  let text = "";
  for (const child of node.childNodes) {
    if (child.nodeType === 3) text += child.nodeValue;
    else if (child.nodeType !== 1) continue;
    else if (child.tagName === "BR") text += "\n";
    else if (!["SCRIPT", "STYLE", "TEMPLATE", "NOSCRIPT"].includes(child.tagName)) {
      text += cellText(child);
    }
  }
  return text;
}

/** Integer spans of at least 1 (and at most HTML's caps), set only when above 1. */
function setSpans(cell, rowSpan, colSpan) {
  const rows = Math.min(count(rowSpan, 1) ?? 1, MAX_ROWSPAN);
  const cols = Math.min(count(colSpan, 1) ?? 1, MAX_COLSPAN);
  if (rows > 1) cell.rowSpan = rows;
  if (cols > 1) cell.colSpan = cols;
}

/** A whole number >= min from a number or a string of digits, else null. */
function count(value, min) {
  const digits = typeof value === "string" && /^\s*\d+\s*$/.test(value);
  const n = typeof value === "number" ? value : digits ? Number(value) : NaN;
  return Number.isInteger(n) && n >= min ? n : null;
}
