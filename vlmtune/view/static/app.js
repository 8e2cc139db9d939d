// vlmtune view: the page. Plain DOM, no library; every text from the data goes in as textContent (never as HTML).
"use strict";

const IGNORE = -100;
const SVGNS = "http://www.w3.org/2000/svg";
let INFO = null;
let runTimer = null;

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function show(...nodes) {
  const app = document.getElementById("app");
  app.replaceChildren(...nodes.flat(2).filter(n => n !== null && n !== undefined));
}

// ------------------------------------------------------------------ data: the list

function listState() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  return q;
}

async function showList() {
  const params = listState();
  const page = parseInt(params.get("page") || "0", 10);
  const form = el("form", {class: "filters", id: "filters"},
    el("input", {name: "q", placeholder: "search id or text", value: params.get("q") || ""}),
    el("select", {name: "shape"}, el("option", {value: "", text: "any shape"}),
      INFO.shapes.map(s => el("option", {value: s, text: s, selected: params.get("shape") === s}))),
    el("label", {text: "length "}), el("input", {name: "min", type: "number", placeholder: "min", value: params.get("min") || ""}),
    el("input", {name: "max", type: "number", placeholder: "max", value: params.get("max") || ""}),
    el("label", {}, el("input", {name: "problems", type: "checkbox", checked: params.get("problems") === "1"}), " with problems"),
    el("label", {}, el("input", {name: "over", type: "checkbox", checked: params.get("over") === "1"}),
      ` over --max_seq_length (${INFO.max_seq_length ?? "not set"})`),
    el("button", {type: "submit", text: "show"}));
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v !== "") p.set(k, v === "on" ? "1" : v);
    location.hash = "#/?" + p.toString();
  });
  const query = new URLSearchParams(params);
  query.set("page", String(page));
  const data = await getJSON("/api/records?" + query.toString());
  const rows = data.rows.map(r => el("tr", {class: "row" + (r.problems.some(p => p.startsWith("ERROR")) ? " bad" : ""),
      "data-index": r.index, onclick: () => { location.hash = `#/record/${r.index}`; }},
    el("td", {text: r.index}), el("td", {class: "rid", text: r.id ?? ""}), el("td", {text: r.shape ?? "-"}),
    el("td", {class: r.over ? "over" : null, text: r.length ?? "-"}),
    el("td", {}, r.problems.slice(0, 2).map(p => el("div", {class: "problem" + (p.startsWith("WARNING") ? " warning" : ""), text: p}))),
    el("td", {text: r.preview})));
  const pages = Math.max(1, Math.ceil(data.total / data.page_size));
  const go = p => { const q = listState(); q.set("page", String(p)); location.hash = "#/?" + q.toString(); };
  show(
    el("pre", {class: "summary", text: INFO.summary}),
    INFO.file_problems.map(p => el("div", {class: "problem", text: p})),
    rewardsNode(INFO.rewards, "GRPO rewards (each prompt's page shows what they are called with)"),
    form,
    el("div", {class: "pager"}, el("button", {text: "prev", disabled: page <= 0, onclick: () => go(page - 1)}),
      el("span", {id: "count", text: `${data.total} record(s), page ${page + 1} of ${pages}`}),
      el("button", {text: "next", disabled: page + 1 >= pages, onclick: () => go(page + 1)})),
    el("table", {id: "records"}, el("tr", {}, ["index", "id", "shape", "tokens", "problems", "text"].map(h => el("th", {text: h}))), rows));
}

// ------------------------------------------------------------------ data: one record

function recordQuery(index) {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  q.set("index", String(index));
  return q;
}

function tokenText(s) {
  const t = s.text.replace(/\n/g, "\u21b5\n");
  return t === "" ? "\u2205" : t;
}

function describeToken(s) {
  const label = s.label === IGNORE ? "-100 (not trained)" : `${s.label} (trained)`;
  return `token ${s.i}: id ${s.id} | text ${JSON.stringify(s.text)} | label ${label} | position (t, h, w) = (${s.pos.join(", ")})` +
    (s.reply !== null && s.reply !== undefined ? ` | reply ${s.reply + 1}` : "");
}

function describeVision(s) {
  return `${s.vision} ${s.n}: ${s.count} <|${s.vision}_pad|> tokens (id ${s.id}) from token ${s.start}; ` +
    `positions (t, h, w) from (${s.first.join(", ")}) to (${s.last.join(", ")}); label -100`;
}

function sequenceNode(seq) {
  const detail = el("div", {class: "detail", text: "hover or click a token"});
  const nodes = seq.segments.map(s => {
    if (s.vision) {
      return el("span", {class: "vision", "data-kind": s.vision, "data-count": s.count, title: describeVision(s),
        onclick: () => { detail.textContent = describeVision(s); }, text: `[${s.vision} ${s.n}: ${s.count} tokens]`});
    }
    const cls = ["tok"];
    if (s.label !== IGNORE) cls.push("trained");
    if (s.reply !== null && s.reply !== undefined) cls.push("reply");
    if (/^<\|.*\|>$/.test(s.text)) cls.push("special");
    const node = el("span", {class: cls.join(" "), "data-i": s.i, title: describeToken(s), text: tokenText(s)});
    node.addEventListener("mouseenter", () => { detail.textContent = describeToken(s); });
    node.addEventListener("click", () => {
      document.querySelectorAll(".tok.selected").forEach(n => n.classList.remove("selected"));
      node.classList.add("selected");
      detail.textContent = describeToken(s);
    });
    return node;
  });
  return el("div", {class: "sequence", "data-name": seq.name},
    el("h3", {text: `${seq.name}: ${seq.length} tokens, ${seq.trained} trained, ${seq.replies} labelled span(s)`}),
    detail, el("div", {class: "tokens"}, nodes));
}

function mediumNode(m, i, boxes) {
  const caption = m.kind === "image" ? `image ${i + 1}: ${m.width}x${m.height} px` :
    `video: ${m.width}x${m.height} px, ${m.frames} frames` + (m.listed ? " given as a list" : "") + ` at ${m.fps} fps`;
  const media = m.kind === "image" ? el("img", {src: m.url, alt: caption}) :
    m.url ? el("video", {src: m.url, controls: true, muted: true}) : null;
  const box = el("div", {class: "medium"}, media, el("div", {text: caption}));
  const mine = boxes.filter(b => b.image === i);
  if (m.kind === "image" && mine.length) {
    const svg = el("svg:svg", {class: "boxes", viewBox: `0 0 ${m.width} ${m.height}`, preserveAspectRatio: "none"});
    for (const b of mine) {
      const [x1, y1, x2, y2] = b.original;
      svg.append(el("svg:rect", {x: x1, y: y1, width: x2 - x1, height: y2 - y1, fill: "none", stroke: "#e53935",
        "stroke-width": Math.max(2, m.width / 150)}));
    }
    media.addEventListener("load", () => { svg.setAttribute("width", media.clientWidth); svg.setAttribute("height", media.clientHeight); });
    box.append(svg, ...mine.map(b => el("div", {class: "boxline",
      text: `box [${b.source.join(", ")}] -> ${b.format} [${b.converted.join(", ")}], original pixels [${b.original.map(v => v.toFixed(0)).join(", ")}]`})));
  }
  return box;
}

// GRPO's reward settings: each function with its weight and, per prompt, the keyword arguments training calls it
// with for this record; the reward model; the other settings that shape a completion's reward.
function rewardsNode(rw, title) {
  if (!rw) return null;
  const perPrompt = rw.functions.some(f => f.kwargs);
  const args = f => ["completions", ...Object.entries(f.kwargs).map(([k, v]) => `${k}=${JSON.stringify(v)}`),
    ...f.reads.filter(k => !(k in f.kwargs)).map(k => `${k}=<missing>`)].join(", ");
  const rows = rw.functions.map(f => el("tr", {class: "reward", "data-name": f.name, "data-weight": f.weight},
    el("td", {text: f.name}), el("td", {text: `\u00d7 ${f.weight}`}),
    perPrompt ? el("td", {class: "call", text: `${f.name}(${args(f)})`}) : null));
  if (rw.reward_model) rows.push(el("tr", {class: "reward", "data-name": "reward_model", "data-weight": rw.reward_model.weight},
    el("td", {text: `--reward_model ${rw.reward_model.name}`}), el("td", {text: `\u00d7 ${rw.reward_model.weight}`}),
    perPrompt ? el("td", {class: "call", text: "scores the prompt with each completion"}) : null));
  const head = ["reward", "weight"].concat(perPrompt ? ["called for this prompt with"] : []);
  return el("div", {class: "rewards", id: "rewards"}, el("h3", {text: title}),
    el("table", {}, el("tr", {}, head.map(h => el("th", {text: h}))), rows),
    el("div", {class: "muted", id: "reward-settings",
      text: Object.entries(rw.settings || {}).map(([k, v]) => `--${k} ${v ?? "-"}`).join("   ")}));
}

async function showRecord(index) {
  const params = recordQuery(index);
  const r = await getJSON("/api/record?" + params.toString());
  const sw = r.switches;
  const setSwitch = (k, v) => { const q = new URLSearchParams(location.hash.split("?")[1] || ""); if (v === "") q.delete(k); else q.set(k, v);
    location.hash = `#/record/${index}?` + q.toString(); };
  const switches = INFO.stage === "cpt" ? el("div", {class: "muted", text: "CPT: every text token trains"}) :
    el("div", {class: "switches"},
      // DPO labels each reply as its pair's last turn, GRPO trains no prompt token: --label_mode is SFT's
      el("label", {text: "--label_mode "}, el("select", {id: "label_mode", disabled: INFO.stage !== "sft",
        onchange: e => setSwitch("label_mode", e.target.value)},
        INFO.label_modes.map(m => el("option", {value: m, text: m, selected: m === sw.label_mode})))),
      el("label", {text: "--enable_thinking "}, el("select", {id: "enable_thinking", disabled: !INFO.has_thinking_switch,
        onchange: e => setSwitch("enable_thinking", e.target.value)},
        [["", "template default"], ["true", "true"], ["false", "false"]].map(([v, t]) =>
          el("option", {value: v, text: t, selected: String(sw.enable_thinking ?? "") === v})))),
      el("label", {}, el("input", {id: "keep_earlier_reasoning", type: "checkbox", checked: !!sw.keep_earlier_reasoning,
        onchange: e => setSwitch("keep_earlier_reasoning", e.target.checked ? "true" : "false")}), " --keep_earlier_reasoning"));
  const lengthLine = r.length === null ? "length: not measured (the record has errors)" :
    `length ${r.length} tokens (vision included)` + (r.max_seq_length ? ` against --max_seq_length ${r.max_seq_length}` +
      (r.over ? ": OVER, training skips it" : ": fits") : " (no --max_seq_length given)");
  const seqs = (r.sequences || []).map(sequenceNode);
  show(
    el("p", {}, el("a", {href: "#/", text: "\u2190 all records"})),
    el("h2", {id: "record-title", text: `record ${r.index} (id ${JSON.stringify(r.id)})${r.shape ? ", " + r.shape : ""}`}),
    el("div", {id: "problems"}, r.problems.map(p => el("div", {class: "problem" + (p.startsWith("WARNING") ? " warning" : ""), text: p}))),
    r.encode_error ? el("div", {class: "problem", id: "encode-error", text: r.encode_error}) : null,
    el("p", {id: "length", class: r.over ? "over" : null, text: lengthLine}),
    r.sequences ? switches : null,
    el("div", {class: "media"}, (r.media || []).map((m, i) => mediumNode(m, m.kind === "image" ? i : i, r.boxes || []))),
    (r.frames || []).map(v => el("div", {class: "frames", "data-video": v.video},
      el("div", {class: "muted", text: `video ${v.video + 1}: ${v.frames.length} frames sampled as training samples them, ` +
        `resized to ${v.width}x${v.height}`}),
      el("div", {class: "media"}, v.frames.map(f => el("div", {class: "medium"}, el("img", {src: f.url, alt: `frame ${f.index}`}),
        el("div", {text: `frame ${f.index}` + (f.time === null ? "" : `, ${f.time} s`)})))))),
    rewardsNode(r.rewards, "rewards scoring this prompt's completions (summed with their weights)"),
    r.fields ? el("pre", {class: "summary", id: "fields", text: "record fields: " + JSON.stringify(r.fields, null, 1)}) : null,
    r.sequences ? el("div", {class: "legend"}, el("span", {class: "tok trained", text: "trained (label = id)"}),
      el("span", {class: "tok reply", text: "reply, not trained"}), el("span", {class: "vision", text: "[vision pads]"})) : null,
    seqs.length > 1 ? el("div", {class: "pair"}, seqs) : seqs);
}

// ------------------------------------------------------------------ run: plots, facts, predictions

const PANELS = [
  {title: "training loss", keys: ["loss", "eval_loss"]},
  {title: "eval loss", keys: ["eval_loss"]},
  {title: "eval metrics", match: k => k.startsWith("eval_") && !/^eval_(loss|runtime|samples_per_second|steps_per_second|model_preparation_time)$/.test(k) && !k.startsWith("eval_rewards/")},
  {title: "learning rate", match: k => k.startsWith("lr/"), fallback: ["learning_rate"], log: true},
  {title: "grad norm", keys: ["grad_norm"]},
  {title: "tokens / s", keys: ["tokens_per_s"]},
  {title: "DPO reward margin", keys: ["rewards/margins", "eval_rewards/margins"]},
  {title: "DPO accuracy", keys: ["rewards/accuracies", "eval_rewards/accuracies"]},
  {title: "DPO rewards", keys: ["rewards/chosen", "rewards/rejected"]},
  {title: "GRPO reward", keys: ["reward", "reward_std"]},
  {title: "GRPO reward per function", match: k => /^rewards\/.+\/mean$/.test(k)},
  {title: "completion length", keys: ["completions/mean_length", "completions/min_length", "completions/max_length"]},
];
const COLORS = ["#1565c0", "#ef6c00", "#2e7d32", "#c62828", "#6a1b9a", "#00838f", "#5d4037"];

function seriesOf(log, key) {
  return log.filter(e => typeof e[key] === "number" && Number.isFinite(e[key]) && typeof e.step === "number")
    .map(e => [e.step, e[key]]);
}

function panelKeys(panel, log) {
  const all = new Set(log.flatMap(e => Object.keys(e)));
  let keys = panel.keys ? panel.keys : [...all].filter(panel.match).sort();
  if (!keys.length && panel.fallback) keys = panel.fallback;
  return keys.filter(k => seriesOf(log, k).length);
}

function plotNode(title, series) {
  const W = 360, H = 220, L = 52, R = 10, T = 24, B = 30;
  const pts = series.flatMap(s => s.points);
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 + 1e-9; y1 += Math.abs(y1) * 0.1 + 1e-9; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  const fmt = v => Math.abs(v) >= 1000 || (Math.abs(v) < 0.01 && v !== 0) ? v.toExponential(1) : +v.toPrecision(3);
  const svg = el("svg:svg", {class: "plot", width: W, height: H, "data-title": title},
    el("svg:text", {class: "title", x: L, y: 16, text: title}),
    el("svg:line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}),
    el("svg:line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}),
    el("svg:text", {x: 2, y: sy(y1) + 4, text: fmt(y1)}), el("svg:text", {x: 2, y: sy(y0), text: fmt(y0)}),
    el("svg:text", {x: L, y: H - 10, text: `step ${x0}`}), el("svg:text", {x: W - R - 60, y: H - 10, text: `step ${x1}`}));
  series.forEach((s, k) => {
    const color = COLORS[k % COLORS.length];
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(el("svg:path", {d, fill: "none", stroke: color, "stroke-width": 1.6, "data-key": s.key}));
    if (s.points.length < 30) s.points.forEach(p => svg.append(el("svg:circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color})));
    const legend = el("svg:text", {x: W - R - 150, y: T + 12 * (k + 1), text: s.key});
    legend.style.fill = color;  // a style property, not an attribute: the stylesheet's grey must not win
    svg.append(legend);
  });
  return svg;
}

function plotsNode(log) {
  const panels = PANELS.map(p => ({p, keys: panelKeys(p, log)})).filter(x => x.keys.length);
  if (!panels.length) return el("p", {class: "muted", id: "no-plots", text: "nothing logged yet (the page refreshes while the run trains)"});
  return el("div", {class: "plots", id: "plots"}, panels.map(({p, keys}) =>
    plotNode(p.title, keys.map(key => ({key, points: seriesOf(log, key)})))));
}

function factsNode(facts) {
  if (!facts) return el("p", {class: "muted", text: "no vlmtune_run.json (an eval folder, or a run before its first save)"});
  const rows = Object.entries(facts).map(([k, v]) =>
    el("tr", {}, el("td", {text: k}), el("td", {}, el("pre", {text: typeof v === "string" ? v : JSON.stringify(v, null, 1)}))));
  return el("table", {class: "facts", id: "facts"}, rows);
}

function metricsText(m) {
  return Object.entries(m || {}).map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(3) : v}`).join(", ");
}

function predictionsNode(pred) {
  if (!pred.rows.length) return el("p", {class: "muted", text: "no eval predictions (train with --eval_generate True, or vlmtune eval)"});
  const names = Object.keys((pred.metrics && pred.metrics.models) || {});  // eval's --name and --compare_name
  const head = ["#", "id", "agreement", "reference", pred.compare ? `${names[0] || "first"} prediction` : "prediction", "metrics"];
  if (pred.compare) head.push(`${names[1] || "compared"} prediction`, "metrics");
  const rows = pred.rows.map((r, i) => {
    const cls = r.agreement === null ? null : r.agreement < 0.5 ? "agree-low" : "agree-high";
    const cells = [el("td", {text: i + 1}), el("td", {text: r.id}), el("td", {class: cls, text: r.agreement === null ? "-" : r.agreement.toFixed(3)}),
      el("td", {class: "pred", text: r.reference ?? ""}), el("td", {class: "pred", text: r.prediction ?? ""}),
      el("td", {text: metricsText(r.metrics) + (r.boxes ? ` boxes ${JSON.stringify(r.boxes)}` : "")}, groundingNode(r))];
    if (pred.compare) cells.push(el("td", {class: "pred", text: r.compare ? r.compare.prediction : ""}),
      el("td", {text: r.compare ? metricsText(r.compare.metrics) : ""}));
    return el("tr", {class: "prediction"}, cells);
  });
  return el("table", {id: "predictions"}, el("tr", {}, head.map(h => el("th", {text: h}))), rows);
}

const PRED_COLOUR = "#d81b60", REF_COLOUR = "#2e7d32";

// A grounding prediction on each of its images: predicted boxes and points against the reference ones, in the
// image's original pixels (the line's coordinates), scaled with the image as the browser shows it.
function groundingNode(r) {
  const found = [...(r.boxes || []).map(b => ({...b, ref: false})), ...(r.reference_boxes || []).map(b => ({...b, ref: true}))];
  if (!r.images || !found.length) return null;
  return r.images.map((path, i) => {
    const mine = found.filter(b => b.image === i);
    if (!mine.length || path.includes("://")) return null;
    const img = el("img", {src: "/file?path=" + encodeURIComponent(path), alt: `image ${i + 1}`});
    const svg = el("svg:svg", {class: "boxes", preserveAspectRatio: "none"});
    img.addEventListener("load", () => {
      const w = img.naturalWidth, h = img.naturalHeight, stroke = Math.max(1, w / 100);
      svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
      svg.setAttribute("width", img.clientWidth);
      svg.setAttribute("height", img.clientHeight);
      for (const b of mine) {
        const colour = b.ref ? REF_COLOUR : PRED_COLOUR, cls = b.ref ? "ref-box" : "pred-box", c = b.coords;
        svg.append(b.kind === "bbox" ?
          el("svg:rect", {class: cls, x: c[0], y: c[1], width: c[2] - c[0], height: c[3] - c[1], fill: "none", stroke: colour, "stroke-width": stroke}) :
          el("svg:circle", {class: cls, cx: c[0], cy: c[1], r: 2 * stroke, fill: "none", stroke: colour, "stroke-width": stroke}));
      }
    });
    return el("div", {class: "medium grounding"}, img, svg,
      el("div", {}, el("span", {class: "legend-pred", text: "predicted"}), " vs ", el("span", {class: "legend-ref", text: "reference"})));
  });
}

let lastRun = null;
async function showRun() {
  const state = await getJSON("/api/run");
  const key = JSON.stringify([state.log.length, state.log_mtime, state.predictions.rows.length, !!state.facts]);
  if (key !== lastRun) {
    lastRun = key;
    const train = state.log.filter(e => "loss" in e).length;
    show(
      el("h2", {text: `run ${state.folder}`}),
      el("p", {class: "muted", id: "log-count", text: `${train} training log step(s), ${state.log.filter(e => "eval_loss" in e).length} evaluation(s); refreshes every 3 s`}),
      plotsNode(state.log),
      rewardsNode(state.rewards, "GRPO rewards (vlmtune_run.json)"),
      el("h2", {text: "facts (vlmtune_run.json)"}), factsNode(state.facts),
      el("h2", {text: "eval predictions, most disagreeing first"}), predictionsNode(state.predictions));
  }
  clearTimeout(runTimer);
  runTimer = setTimeout(() => showRun().catch(showError), 3000);
}

// ------------------------------------------------------------------ routing

function showError(e) {
  show(el("div", {class: "problem", id: "page-error", text: String(e.message || e)}));
}

async function route() {
  try {
    if (!INFO) {
      INFO = await getJSON("/api/info");
      document.getElementById("where").textContent = INFO.file || INFO.folder;
    }
    if (INFO.mode === "run") return await showRun();
    const m = location.hash.match(/^#\/record\/(\d+)/);
    if (m) return await showRecord(parseInt(m[1], 10));
    return await showList();
  } catch (e) {
    showError(e);
  }
}

window.addEventListener("hashchange", route);
route();
