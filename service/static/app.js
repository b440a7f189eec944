// The page: one WebSocket per stream. Each block arrives as a JSON message and then one binary message of
// uint8 RGB frames [f, H, W, 3]; frames are played at the video's fps as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
// window.sfState is read by the browser test (and is handy in the console).
const state = window.sfState = {
  status: "idle", blocksReceived: 0, framesReceived: 0, framesDrawn: 0, numBlocks: null,
  firstFrameDrawnAt: null, generationDoneAt: null, startedAt: null, jobId: null, error: null, switches: [],
  segments: [],
};
let socket = null, info = null, pendingBlock = null, queue = [], timer = null;

function setStatus(text) { state.status = text; $("status").textContent = text; }
function say(text) { $("message").textContent = text || ""; }

async function loadInfo() {
  info = await (await fetch("config")).json();
  $("model").textContent = `${info.model} · ${info.width}x${info.height} · ${info.fps} fps · ${info.device} · ${info.decoder} decoder`;
  $("image-field").hidden = !info.takes_image;  // only a student that learnt image-to-video starts from an image
  $("image-label").textContent = info.needs_image ? "First frame" : "First frame (optional)";  // a student of both tasks
  $("segments-panel").hidden = !info.judge;  // adherence over time needs a judge (the miniature's)
  if (info.judge) $("segments-note").textContent =
    `judge ${info.judge}: each ${info.segment_frames}-frame segment against the prompt it was made under`;
  $("frames").value = info.num_frames;
  $("frames").max = info.max_frames;
  $("canvas").width = info.width;
  $("canvas").height = info.height;
}

function readImage() {
  const file = $("image").files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);  // a data: URL, accepted by the server
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function drawNext() {
  if (!queue.length) return;
  const { rgb, width, height } = queue.shift();
  const canvas = $("canvas");
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const image = canvas.getContext("2d").createImageData(width, height);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    image.data[j] = rgb[i]; image.data[j + 1] = rgb[i + 1]; image.data[j + 2] = rgb[i + 2]; image.data[j + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  state.framesDrawn += 1;
  if (state.firstFrameDrawnAt === null) state.firstFrameDrawnAt = performance.now();
}

function onBlock(header, bytes) {
  const width = state.width, height = state.height, size = width * height * 3;
  for (let f = 0; f < header.frames; f++) queue.push({ rgb: new Uint8Array(bytes, f * size, size), width, height });
  state.blocksReceived += 1;
  state.framesReceived += header.frames;
  if (state.blocksReceived === 1) {
    $("ttfb").textContent = `${((performance.now() - state.startedAt) / 1000).toFixed(2)} s`;
    drawNext();  // the first frame at once, then at the video's pace
  }
  const seconds = (performance.now() - state.startedAt) / 1000;
  $("fps").textContent = (state.framesReceived / seconds).toFixed(1);
  $("blocks").textContent = `${state.blocksReceived} / ${state.numBlocks ?? "?"}`;
}

// Adherence of each judged segment against its start in seconds; the first segment's level dashed; a segment whose
// prompt the judge cannot read is marked at the bottom as not judged.
function drawSegments() {
  const svg = $("segments"), ns = "http://www.w3.org/2000/svg";
  const left = 34, right = 310, top = 10, bottom = 112, fps = info ? info.fps : 1;
  const add = (name, attributes, text) => {
    const node = document.createElementNS(ns, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  svg.replaceChildren();
  const last = state.segments.length ? state.segments[state.segments.length - 1] : null;
  const span = Math.max(last ? (last.start_frame + last.frames) / fps : 1, 1e-6);
  const x = (seconds) => left + (right - left) * seconds / span;
  const y = (value) => bottom - (bottom - top) * value;
  add("line", { x1: left, y1: bottom, x2: right, y2: bottom, stroke: "#78716c" });
  add("line", { x1: left, y1: top, x2: left, y2: bottom, stroke: "#78716c" });
  for (const value of [0, 0.5, 1]) add("text", { x: left - 4, y: y(value) + 3, "text-anchor": "end", "font-size": 9 }, value);
  add("text", { x: (left + right) / 2, y: 134, "text-anchor": "middle", "font-size": 9 }, "segment start (s)");
  const judged = state.segments.filter((segment) => segment.adherence !== null);
  if (judged.length) {
    add("line", { x1: left, x2: right, y1: y(judged[0].adherence), y2: y(judged[0].adherence), stroke: "#a8a29e",
                  "stroke-dasharray": "4 3" });
    const points = judged.map((s) => `${x(s.start_frame / fps).toFixed(1)},${y(s.adherence).toFixed(1)}`);
    add("polyline", { points: points.join(" "), fill: "none", stroke: "#2563eb", "stroke-width": 1.5 });
  }
  for (const segment of state.segments) {
    const seconds = segment.start_frame / fps, judgedOne = segment.adherence !== null;
    add("circle", { cx: x(seconds), cy: y(judgedOne ? segment.adherence : 0), r: 3, class: "segment-point",
                    fill: judgedOne ? "#2563eb" : "white", stroke: "#2563eb" });
    add("text", { x: x(seconds), y: bottom + 11, "text-anchor": "middle", "font-size": 9 }, seconds.toFixed(1));
  }
}

function finish(status) {
  setStatus(status);
  $("start").disabled = false; $("stop").disabled = true; $("switch").disabled = true;
}

function handle(message) {
  if (message.type === "queued") {
    state.jobId = message.job_id;
    $("queue").textContent = message.queue_position;
    setStatus(message.queue_position > 0 ? "waiting" : "starting");
  } else if (message.type === "started") {
    Object.assign(state, { numBlocks: message.num_blocks, width: message.width, height: message.height });
    $("queue").textContent = "0";
    setStatus("generating");
    clearInterval(timer);
    timer = setInterval(drawNext, 1000 / message.fps);
  } else if (message.type === "block") {
    pendingBlock = message;
  } else if (message.type === "segment") {
    state.segments.push(message);
    drawSegments();
  } else if (message.type === "prompt_switched") {
    state.switches.push(message);
    say(`prompt changed from block ${message.block}`);
  } else if (message.type === "done") {
    state.generationDoneAt = performance.now();
    $("save").href = message.video_url;
    $("save").hidden = false;
    finish("done");
  } else if (message.type === "stopped") {
    finish("stopped");
  } else if (message.type === "error" || message.type === "warning") {
    state.error = message.error;
    say(`${message.status}: ${message.error}`);
    if (message.type === "error") finish("error");
  }
}

async function start() {
  say("");
  const prompt = $("prompt").value.trim();
  if (!prompt) { say("Type a prompt first."); return; }
  let image = null;
  try { image = await readImage(); } catch (err) { say(`The image cannot be read: ${err}`); return; }
  Object.assign(state, { blocksReceived: 0, framesReceived: 0, framesDrawn: 0, numBlocks: null, firstFrameDrawnAt: null,
                         generationDoneAt: null, startedAt: performance.now(), error: null, switches: [],
                         segments: [] });
  drawSegments();
  queue = [];
  $("save").hidden = true;
  $("ttfb").textContent = "-"; $("fps").textContent = "-"; $("blocks").textContent = "-";
  const request = { prompt, seed: Number($("seed").value || 0) };
  if ($("frames").value) request.num_frames = Number($("frames").value);
  if (image) request.image = image;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}${location.pathname.replace(/[^/]*$/, "")}ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => socket.send(JSON.stringify(request));
  socket.onmessage = (event) => {
    if (typeof event.data === "string") handle(JSON.parse(event.data));
    else if (pendingBlock) { onBlock(pendingBlock, event.data); pendingBlock = null; }
  };
  socket.onclose = () => { if (state.status === "generating" || state.status === "waiting") finish("disconnected"); };
  $("start").disabled = true; $("stop").disabled = false; $("switch").disabled = false;
  setStatus("connecting");
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => socket && socket.send(JSON.stringify({ type: "stop" })));
$("switch").addEventListener("click", () => {
  const prompt = $("next_prompt").value.trim();
  if (!prompt || !socket) return;
  socket.send(JSON.stringify({ type: "switch_prompt", prompt, recache: $("recache").checked }));
});
loadInfo().catch((err) => say(`The server cannot be reached: ${err}`));
