// ragws.js — a browser client for the ragws WebSocket protocol (docs/protocol.md).
//
// An ES module with no build step. Its one dependency is the vendored msgpack build,
// vendor/msgpack.min.js, a UMD bundle that cannot be imported as a module: it sets the global
// `MessagePack`. Pages may load it first with a classic script tag; otherwise this module loads
// it from beside itself before it finishes loading. See static/README.md for the API.
//
//   import { connect } from "/static/ragws.js";
//   const client = connect("ws://127.0.0.1:7088/ws", { apiKey });
//   const layout = await client.layout(pngBytes);
//   for await (const page of client.pdf(pdfBytes, { images: true })) draw(page);
//   const ocr = client.ocr(jpegBytes, { box: [x0, y0, x1, y1] });
//   for await (const token of ocr) show(token.text);
//   const { text } = await ocr.result;

const MSGPACK_URL = new URL("./vendor/msgpack.min.js", import.meta.url);
const { encode, decode } = globalThis.MessagePack ?? (await loadMsgpack(MSGPACK_URL));

/**
 * What a `parse` request's frames hold (docs/protocol.md, "Blocks"). Fields marked optional
 * are sent only on the types named, and not at all by older servers.
 * @typedef {"title" | "heading" | "text" | "list" | "code" | "table" | "equation" | "figure"
 *   | "caption" | "footnote" | "header" | "footer"} BlockType
 * @typedef {object} ParseBlock
 * @property {BlockType | string} type
 * @property {number[]} bbox [x0, y0, x1, y1] in the rendered page's pixels
 * @property {string} text plain text: a list's items, a table's rows ("a | b") one per line
 * @property {string} markdown the block's own markdown ("" for furniture left out of it)
 * @property {number} order its position in the page's reading order
 * @property {"pdf" | "ocr" | "none"} source
 * @property {number} score
 * @property {number} [level] title: 1; heading: 2..6
 * @property {{text: string, level: number, marker: string}[]} [items] a list's items
 * @property {string} [html] a table as <table> markup (text escaped)
 * @property {TableCell[]} [cells] a table's cells, a merged one once
 * @property {Uint8Array} [image] a figure's JPEG, with `figures: true`
 * @typedef {object} TableCell
 * @property {number} row 0-based
 * @property {number} col 0-based
 * @property {number} row_span at least 1
 * @property {number} col_span at least 1
 * @property {string} text
 * @property {number[] | null} bbox
 * @typedef {object} ParseChunk
 * @property {string} text
 * @property {number[]} pages
 * @property {{page: number, bbox: number[]}[]} bboxes
 * @property {string[]} headings the heading path at its first block, outermost first
 */

/** Connection states, in the order a client normally goes through them. */
export const STATES = Object.freeze(["connecting", "open", "reconnecting", "closed"]);

/** An error from the server (its `code` and `message`) or from the connection. Codes: the
 * server's (`bad_request`, `too_large`, `overloaded`, `unsupported`, `internal`,
 * `unavailable`); for a `layout` that ended without its result, the reason it ended:
 * `cancelled`, `timeout` (still queued at its `deadline_ms`), `shutdown`; and this client's
 * own: `disconnected` (the socket dropped while the request was in flight), `closed`
 * (`client.close()` was called). */
export class RagwsError extends Error {
  constructor(code, message, id = null) {
    super(message);
    this.name = "RagwsError";
    this.code = code;
    this.id = id;
  }
}

/** Open a client. `url` is the server's WebSocket URL; an http(s) URL or a bare origin works
 * too, and omitted it is this page's own server. Returns at once: requests made before the
 * socket opens are sent when it does. */
export function connect(url, options = {}) {
  return new Client(url, options);
}

const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 15000, factor: 2, jitter: 0.2 };

export class Client extends EventTarget {
  #url;
  #options;
  #ws = null;
  #state = null; // set to "connecting" by the constructor
  #hello = null;
  #nextId = 1;
  #attempt = 0;
  #timer = null;
  #requests = new Map(); // id → Request, from creation to its last frame
  #outbox = []; // Requests waiting for the socket to open

  constructor(url, { apiKey, onstate, reconnect = true, backoff = {}, WebSocket, deadlineMs } = {}) {
    super();
    this.#url = socketUrl(url, apiKey);
    this.#options = {
      deadlineMs, // sent with every request as deadline_ms (a request's own option wins)
      reconnect,
      backoff: { ...DEFAULT_BACKOFF, ...backoff },
      WebSocket: WebSocket ?? globalThis.WebSocket,
    };
    if (onstate) this.addEventListener("state", (event) => onstate(event.detail));
    this.#setState("connecting", { attempt: 0 });
    this.#open();
  }

  /** "connecting", "open", "reconnecting" or "closed". */
  get state() {
    return this.#state;
  }

  /** The server's `hello` frame (models, limits), once the socket has opened. */
  get hello() {
    return this.#hello;
  }

  /** The URL the client connects to (with the api_key parameter). */
  get url() {
    return this.#url;
  }

  /** Resolves with the `hello` frame when the client is (or next becomes) open. */
  opened() {
    if (this.#state === "open") return Promise.resolve(this.#hello);
    if (this.#state === "closed") return Promise.reject(closedError());
    return new Promise((resolve, reject) => {
      const onState = ({ detail }) => {
        if (detail.state === "open") resolve(this.#hello);
        else if (detail.state === "closed") reject(closedError());
        else return;
        this.removeEventListener("state", onState);
      };
      this.addEventListener("state", onState);
    });
  }

  /** Layout of one page image → Promise of the `layout` frame (width, height, boxes, classes,
   * scores, timing). The promise has `.id` and `.cancel()`. Options: conf, iou, signal. */
  layout(image, options = {}) {
    const request = this.#start("layout", { image }, options, false);
    const promise = request.result;
    promise.id = request.id;
    promise.cancel = () => this.cancel(request.id);
    return promise;
  }

  /** Layout of a PDF's pages → Stream of `page` frames in completion order; `.result` is the
   * `done` summary. Options: pages (0-based), scale, images (JPEG of each page), conf, iou,
   * signal. */
  pdf(pdf, options = {}) {
    return this.#start("pdf", { pdf }, options, true).stream;
  }

  /** OCR of an image (or of `box` within it) → Stream of `token` frames; `.result` is the
   * `done` frame with the whole `text`. Options: box, mode, max_tokens, crop, signal. */
  ocr(image, options = {}) {
    return this.#start("ocr", { image }, options, true).stream;
  }

  /** Parse a PDF or an image (told apart by its first bytes) → Stream of `page` frames, each
   * with its `blocks` (ParseBlock[]); `.result` is the `done` frame with markdown and chunks
   * (ParseChunk[]). Options: pages, text, chunk_chars, scale, figures, furniture, signal. */
  parse(document, options = {}) {
    return this.#start("parse", { document }, options, true).stream;
  }

  /** Cancel a request by id. Returns false when the id is not in flight on this client. */
  cancel(id) {
    const request = this.#requests.get(id);
    if (!request || request.ended || request.cancelling) return false;
    request.cancelling = true;
    if (request.sent) {
      this.#transmit({ type: "cancel", id });
    } else {
      // Never sent: end it here, as the server would have.
      this.#outbox = this.#outbox.filter((queued) => queued !== request);
      this.#deliver({ type: "done", id, finish_reason: "cancelled" });
    }
    return true;
  }

  /** Close the socket for good; requests still open fail with code `closed`. */
  close() {
    if (this.#state === "closed") return;
    clearTimeout(this.#timer);
    this.#failAll(closedError());
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.close(1000, "client closed");
    this.#setState("closed", {});
  }

  // --- requests ---------------------------------------------------------------------------

  #start(type, input, options, streaming) {
    const id = this.#nextId++;
    const { signal, ...fields } = options;
    const request = new Request(this, id, type, streaming);
    if (this.#state === "closed") {
      request.fail(closedError(id));
      return request;
    }
    this.#requests.set(id, request);
    const [name, value] = Object.entries(input)[0];
    toBytes(value).then(
      (bytes) => {
        if (request.ended) return;
        let field = name;
        if (type === "parse") field = isPdf(bytes) ? "pdf" : "image";
        const deadline = this.#options.deadlineMs;
        request.frame = {
          ...(deadline ? { deadline_ms: deadline } : {}),
          ...definedFields(fields),
          type,
          id,
          [field]: bytes,
        };
        this.#outbox.push(request);
        this.#flush();
      },
      (error) => this.#end(id, () => request.fail(new RagwsError("bad_request", String(error), id))),
    );
    if (signal) {
      const abort = () => this.cancel(id);
      if (signal.aborted) abort();
      else signal.addEventListener("abort", abort, { once: true });
    }
    return request;
  }

  #flush() {
    if (this.#state !== "open") return;
    const limit = this.#hello?.limits?.max_frame_bytes;
    for (const request of this.#outbox.splice(0)) {
      const data = encode(request.frame);
      request.frame = null; // the payload can be large: keep no second copy
      if (limit && data.byteLength > limit) {
        // The server would close the socket (1009) and fail every other request with it.
        const message = `the request is ${data.byteLength} bytes, over the server's frame limit of ${limit} bytes`;
        this.#end(request.id, () => request.fail(new RagwsError("too_large", message, request.id)));
        continue;
      }
      request.sent = true;
      this.#ws.send(data);
    }
  }

  #transmit(frame) {
    if (this.#state === "open") this.#ws.send(encode(frame));
  }

  #deliver(frame) {
    const request = this.#requests.get(frame.id);
    if (!request) return; // e.g. the error answering a cancel that crossed the request's end
    if (frame.type === "error") {
      this.#end(frame.id, () => request.fail(new RagwsError(frame.code, frame.message, frame.id)));
    } else if (frame.type === "done" || frame.type === "layout") {
      this.#end(frame.id, () => request.finish(frame));
    } else {
      request.push(frame);
    }
  }

  #end(id, settle) {
    const request = this.#requests.get(id);
    if (!request) return;
    this.#requests.delete(id);
    settle();
  }

  #failAll(error) {
    const requests = [...this.#requests.values()];
    this.#requests.clear();
    this.#outbox = [];
    for (const request of requests) {
      request.fail(new RagwsError(error.code, error.message, request.id));
    }
  }

  // --- the socket -------------------------------------------------------------------------

  #open() {
    let ws;
    try {
      ws = new this.#options.WebSocket(this.#url);
    } catch (error) {
      // e.g. a port the browser blocks: count it as a failed attempt and keep trying.
      this.#ws = null;
      setTimeout(() => this.#state !== "closed" && this.#dropped(1006, error.message), 0);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.#ws = ws;
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      if (typeof event.data === "string") return; // the protocol has no text frames
      let frame;
      try {
        frame = decode(new Uint8Array(event.data));
      } catch (error) {
        this.#dispatchError(new RagwsError("bad_frame", `unreadable frame: ${error.message}`));
        return;
      }
      if (frame?.type === "hello") {
        this.#hello = frame;
        this.#attempt = 0;
        this.#setState("open", { hello: frame });
        this.dispatchEvent(new CustomEvent("hello", { detail: frame }));
        this.#flush();
      } else if (frame?.type === "error" && frame.id == null) {
        this.#dispatchError(new RagwsError(frame.code, frame.message));
      } else if (frame && frame.id != null) {
        this.#deliver(frame);
      }
    };
    ws.onclose = (event) => {
      if (ws !== this.#ws) return;
      this.#ws = null;
      this.#dropped(event.code, event.reason);
    };
  }

  #dropped(code, reason) {
    const why = closeReason(code, reason);
    // Requests already sent are lost with the socket; those never sent wait for the next one.
    for (const request of [...this.#requests.values()]) {
      if (!request.sent) continue;
      this.#end(request.id, () =>
        request.fail(new RagwsError("disconnected", `the connection was lost (${why})`, request.id)),
      );
    }
    if (!this.#options.reconnect) {
      this.#failAll(new RagwsError("closed", `the connection was lost (${why})`));
      this.#setState("closed", { code, reason: why });
      return;
    }
    const { initialMs, maxMs, factor, jitter } = this.#options.backoff;
    const base = Math.min(maxMs, initialMs * factor ** this.#attempt);
    const delayMs = Math.round(base * (1 - jitter + 2 * jitter * Math.random()));
    this.#attempt += 1;
    this.#setState("reconnecting", { attempt: this.#attempt, delayMs, code, reason: why });
    this.#timer = setTimeout(() => this.#open(), delayMs);
  }

  #setState(state, detail) {
    const previous = this.#state;
    this.#state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, previous, ...detail } }));
  }

  #dispatchError(error) {
    this.dispatchEvent(new CustomEvent("error", { detail: error }));
  }
}

/** One request's life on the client: its frames, its end, and the promise or stream that the
 * caller holds. */
class Request {
  constructor(client, id, type, streaming) {
    this.id = id;
    this.type = type;
    this.sent = false;
    this.ended = false;
    this.cancelling = false;
    this.frame = null;
    this.result = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // Marked handled: a caller that only iterates a stream gets the error from the iterator,
    // and must not also see an "unhandled rejection" for the result it never awaited.
    this.result.catch(() => {});
    this.stream = streaming ? new Stream(client, this) : null;
  }

  push(frame) {
    if (!this.ended) this.stream?._push(frame);
  }

  finish(frame) {
    if (this.ended) return;
    this.ended = true;
    if (!this.stream && frame.type === "done") {
      // A one-frame request ended without its result: cancelled, timed out, or shut down.
      const reason = frame.finish_reason ?? "cancelled";
      this._reject(new RagwsError(reason, `the request ended without a result (${reason})`, this.id));
    } else {
      this._resolve(frame);
    }
    this.stream?._end(null);
  }

  fail(error) {
    if (this.ended) return;
    this.ended = true;
    this._reject(error);
    this.stream?._end(error);
  }
}

/** An async iterator over a request's `page` or `token` frames. Leaving a `for await` loop
 * early cancels the request. `result` resolves with the `done` frame (its `finish_reason` is
 * "cancelled" after a cancel) or rejects with the request's RagwsError. */
export class Stream {
  #client;
  #request;
  #queue = [];
  #waiters = [];
  #error = null;
  #ended = false;
  #closed = false; // the consumer left: frames still arriving are dropped

  constructor(client, request) {
    this.#client = client;
    this.#request = request;
    this.id = request.id;
    this.result = request.result;
  }

  /** Cancel the request; the stream then ends and `result` says "cancelled". */
  cancel() {
    return this.#client.cancel(this.id);
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    if (this.#queue.length) return Promise.resolve({ value: this.#queue.shift(), done: false });
    if (this.#error) {
      const error = this.#error;
      this.#error = null;
      this.#closed = true;
      return Promise.reject(error);
    }
    if (this.#ended || this.#closed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  return(value) {
    this.#closed = true;
    this.#queue = [];
    this.#error = null;
    if (!this.#request.ended) this.cancel();
    this.#wakeAll();
    return Promise.resolve({ value, done: true });
  }

  throw(error) {
    this.return();
    return Promise.reject(error);
  }

  _push(frame) {
    if (this.#closed) return;
    const waiter = this.#waiters.shift();
    if (waiter) waiter.resolve({ value: frame, done: false });
    else this.#queue.push(frame);
  }

  _end(error) {
    this.#ended = true;
    if (this.#closed) return;
    if (error && this.#waiters.length) {
      this.#closed = true;
      this.#waiters.shift().reject(error);
    } else if (error) {
      this.#error = error;
    }
    this.#wakeAll();
  }

  #wakeAll() {
    for (const waiter of this.#waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
  }
}

// --- helpers ----------------------------------------------------------------------------

function socketUrl(url, apiKey) {
  const base = globalThis.location?.href;
  const resolved = new URL(url ?? "/ws", base);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  if (resolved.protocol === "https:") resolved.protocol = "wss:";
  if (resolved.pathname === "/" || resolved.pathname === "") resolved.pathname = "/ws";
  if (apiKey != null && apiKey !== "") resolved.searchParams.set("api_key", apiKey);
  return resolved.href;
}

async function toBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (typeof Blob !== "undefined" && value instanceof Blob) {
    return new Uint8Array(await value.arrayBuffer());
  }
  throw new TypeError("expected bytes: a Uint8Array, an ArrayBuffer, a typed array or a Blob");
}

function isPdf(bytes) {
  // As the server's POST /parse tells them apart.
  return String.fromCharCode(...bytes.subarray(0, 5)) === "%PDF-";
}

function definedFields(fields) {
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function closedError(id = null) {
  return new RagwsError("closed", "the client was closed", id);
}

const CLOSE_CODES = {
  1000: "closed normally",
  1001: "the server is going away",
  1006: "the connection dropped",
  1009: "a message was over the server's size limit",
  1011: "the server hit an error",
};

function closeReason(code, reason) {
  const words = reason || CLOSE_CODES[code] || "closed";
  return `code ${code}: ${words}`;
}

async function loadMsgpack(url) {
  if (typeof document !== "undefined") {
    await new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = url.href;
      script.onload = resolve;
      script.onerror = () => reject(new Error(`ragws.js: could not load ${url.href}`));
      document.head.append(script);
    });
  } else {
    // A worker has no script tags: run the bundle with the global object as its `this`.
    const source = await (await fetch(url)).text();
    new Function(source).call(globalThis);
  }
  if (!globalThis.MessagePack) throw new Error(`ragws.js: ${url.href} did not define MessagePack`);
  return globalThis.MessagePack;
}
