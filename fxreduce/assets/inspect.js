// fxreduce inspect page: lays out the view model that fxreduce.inspection.page embeds; computes nothing.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("fxreduce-data").textContent);
  const nodes = data.nodes;
  const byName = new Map(nodes.map((n, i) => [n.name, i]));
  const $ = (id) => document.getElementById(id);
  const text = (value) => String(value).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

  function human(value) {
    if (value === null || value === undefined) return "?";
    const size = Math.abs(value);
    if (size < 10000) return Number.isInteger(value) ? String(value) : value.toPrecision(4);
    for (const [scale, suffix] of [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "K"]]) {
      if (size >= scale) return (value / scale).toPrecision(3) + suffix;
    }
    return String(value);
  }
  function signed(value) { return value === null || value === undefined ? "" : (value > 0 ? "+" : "") + human(value); }
  function pct(old, now) { return old ? (100 * (old - now) / old) : null; }

  // header
  $("title").textContent = data.title;
  $("subtitle").textContent = data.subtitle;
  $("totals").innerHTML = data.totals.filter((t) => ["FLOPs", "params", "activation bytes", "other ops"].includes(t.metric)).map((t) => {
    const change = t.reduction === null || t.reduction === undefined ? "" :
      `<span class="delta ${t.reduction > 0 ? "down" : t.reduction < 0 ? "up" : ""}">${t.reduction > 0 ? "-" : "+"}${Math.abs(t.reduction).toFixed(1)}%</span>`;
    const value = data.is_diff ? `${human(t.before)} &rarr; ${human(t.after)} ${change}` : human(t.before);
    return `<div class="card"><div class="label">${text(t.metric)}</div><div class="value">${value}</div></div>`;
  }).join("");
  $("formulas").innerHTML = Object.entries(data.formulas).map(([k, f]) =>
    `<div><strong>${k}</strong><code class="formula">FLOPs = ${text(f)}</code></div>`).join("");

  // graph: pan and zoom on the SVG's view box
  const holder = $("graph");
  holder.appendChild($("graph-source").content.cloneNode(true));
  const svg = holder.querySelector("svg");
  const full = svg.viewBox.baseVal;
  const home = {x: full.x, y: full.y, w: full.width, h: full.height};
  let view = Object.assign({}, home);
  function apply() { svg.setAttribute("viewBox", `${view.x} ${view.y} ${view.w} ${view.h}`); }
  function scale() { const r = holder.getBoundingClientRect(); return Math.max(view.w / r.width, view.h / r.height); }
  function zoom(factor, cx, cy) {
    const r = holder.getBoundingClientRect();
    const s = scale();
    const px = cx === undefined ? view.x + view.w / 2 : view.x + (cx - r.left) * s - (s * r.width - view.w) / 2;
    const py = cy === undefined ? view.y + view.h / 2 : view.y + (cy - r.top) * s - (s * r.height - view.h) / 2;
    const w = Math.min(Math.max(view.w * factor, 20), home.w * 4), h = view.h * (w / view.w);
    view = {x: px - (px - view.x) * (w / view.w), y: py - (py - view.y) * (h / view.h), w: w, h: h};
    apply();
  }
  function fit() { view = Object.assign({}, home); apply(); }
  function layout() {  // Graphviz's translate on the top group: node coordinates -> view box coordinates
    const group = svg.querySelector("g.graph");
    const transform = group && group.transform.baseVal.consolidate();
    return transform ? transform.matrix : svg.createSVGMatrix();
  }
  function readable() {  // start at the top, one layout unit per pixel, unless the whole graph fits
    const r = holder.getBoundingClientRect();
    if (home.w <= r.width && home.h <= r.height) return fit();
    const w = Math.max(r.width, home.w / 3), h = r.height * (w / r.width);
    view = {x: home.x + (home.w - w) / 2, y: home.y, w: w, h: h};
    apply();
  }
  holder.addEventListener("wheel", (e) => { e.preventDefault(); zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY); }, {passive: false});
  let drag = null;
  holder.addEventListener("mousedown", (e) => { drag = {x: e.clientX, y: e.clientY, view: Object.assign({}, view), moved: false}; holder.classList.add("dragging"); });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const s = scale();
    if (Math.abs(e.clientX - drag.x) + Math.abs(e.clientY - drag.y) > 3) drag.moved = true;
    view.x = drag.view.x - (e.clientX - drag.x) * s; view.y = drag.view.y - (e.clientY - drag.y) * s; apply();
  });
  window.addEventListener("mouseup", () => { holder.classList.remove("dragging"); setTimeout(() => { drag = null; }, 0); });
  $("fit").addEventListener("click", fit);
  holder.addEventListener("dblclick", readable);
  $("zoom-in").addEventListener("click", () => zoom(1 / 1.4));
  $("zoom-out").addEventListener("click", () => zoom(1.4));

  function element(index) {
    const node = nodes[index];
    return svg.getElementById(node.group || node.id);
  }
  function centerOn(index) {
    const el = element(index);
    if (!el) return;
    const box = el.getBBox();
    const point = svg.createSVGPoint(); point.x = box.x + box.width / 2; point.y = box.y + box.height / 2;
    const local = point.matrixTransform(layout());
    const w = Math.min(view.w, Math.max(box.width * 8, 600)), h = view.h * (w / view.w);
    view = {x: local.x - w / 2, y: local.y - h / 2, w: w, h: h};
    apply();
  }
  nodes.forEach((node, index) => {
    if (node.status === "removed") { const el = svg.getElementById(node.id); if (el) el.classList.add("removed-node"); }
  });
  svg.querySelectorAll("g.node").forEach((el) => {
    el.addEventListener("click", () => {
      if (drag && drag.moved) return;
      const title = el.querySelector("title");
      const name = title ? title.textContent : "";
      if (data.groups[el.id]) return showGroup(el.id);
      if (byName.has(name)) select(byName.get(name), false);
    });
  });

  // details panel
  let selected = null;
  function mark(index) {
    svg.querySelectorAll("g.node.selected").forEach((el) => el.classList.remove("selected"));
    const el = element(index);
    if (el) el.classList.add("selected");
  }
  function costRows(node) {
    const rows = [];
    for (const key of ["flops", "params", "bytes"]) {
      const label = {flops: "FLOPs", params: "params", bytes: "act. bytes"}[key];
      const old = node.before ? node.before[key] : null, now = node.after ? node.after[key] : null;
      let value = data.is_diff && node.before && node.after ? `${human(old)} &rarr; ${human(now)}` : human(now !== null ? now : old);
      if (data.is_diff && node.status === "added") value = `new: ${human(now)}`;
      if (node.status === "removed") value = `${human(old)} (removed)`;
      rows.push(`<dt>${label}</dt><dd>${value}</dd>`);
    }
    return rows.join("");
  }
  function rewriteHtml(index) {
    const r = data.rewrites[index];
    return `<div class="rewrite"><div class="pass">${text(r.pass)}</div>` +
      (r.what ? `<div>${text(r.what)}</div>` : "") +
      (r.replaced.length ? `<div class="contract">${text(r.replaced.join(", "))} &rarr; ${text(r.added.join(", ") || "(removed)")}</div>` : "") +
      (r.contract ? `<div class="contract">contract: ${text(r.contract)}</div>` : "") +
      `<div class="contract">FLOPs ${human(r.flops_before)} &rarr; ${human(r.flops_after)}</div></div>`;
  }
  function select(index, center) {
    selected = index;
    const node = nodes[index];
    mark(index);
    if (center) centerOn(index);
    const made = node.rewrites.map(rewriteHtml).join("") ||
      (node.rewritten_by ? `<div class="rewrite"><div class="pass">${text(node.rewritten_by)}</div></div>` : "");
    const group = node.group ? `<p class="hint">Drawn inside a collapsed run of unchanged nodes (${data.groups[node.group].length}).</p>` : "";
    $("details").innerHTML =
      `<h3 id="detail-name">${text(node.name)}</h3><span class="badge ${node.status}">${node.status}</span>` + group +
      `<dl><dt>op</dt><dd>${text(node.op)}</dd><dt>target</dt><dd><code>${text(node.target)}</code></dd>` +
      (node.module ? `<dt>module</dt><dd><code>${text(node.module)}</code></dd>` : "") +
      `<dt>shape</dt><dd><code class="formula" id="detail-shape">${text(node.shape)}</code></dd>` +
      `<dt>at point</dt><dd><code>${text(node.shape_value)}</code></dd>` +
      `<dt>FLOPs</dt><dd><code class="formula" id="detail-formula">${text(node.flops_formula)}</code></dd>` +
      costRows(node) + `</dl>` +
      (made ? `<h4>Made by</h4>${made}` : (data.is_diff ? `<p class="hint">Not touched by the rewrite.</p>` : ""));
  }
  function showGroup(group) {
    const members = data.groups[group];
    svg.querySelectorAll("g.node.selected").forEach((el) => el.classList.remove("selected"));
    const el = svg.getElementById(group); if (el) el.classList.add("selected");
    $("details").innerHTML = `<h3>${members.length} unchanged nodes</h3><span class="badge">collapsed run</span>` +
      `<p class="hint">A run of nodes the rewrite did not touch, drawn as one box so large graphs stay fast. Expanded here:</p>` +
      `<ol class="members">${members.map((i) => `<li data-index="${i}">${text(nodes[i].name)} <span class="hint">${text(nodes[i].shape)}</span></li>`).join("")}</ol>`;
    $("details").querySelectorAll("li[data-index]").forEach((li) => li.addEventListener("click", () => select(+li.dataset.index, false)));
  }

  // search by node name, module path or target; "layer3.0.conv1" also matches node layer3_0_conv1
  const norm = (s) => String(s || "").toLowerCase().replace(/[._]/g, "_");
  const haystack = nodes.map((n) => [n.name, n.module, n.target, (n.replaces || []).join(" ")].map(norm));
  let results = [], active = 0;
  function search(query) {
    const q = norm(query.trim());
    results = [];
    if (!q) { $("search-results").innerHTML = ""; svg.querySelectorAll("g.node.match").forEach((el) => el.classList.remove("match")); return; }
    nodes.forEach((node, i) => {
      const [name, module, target, replaces] = haystack[i];
      const exact = name === q || module === q;
      if (!(exact || name.includes(q) || module.includes(q) || target.includes(q) || replaces.includes(q))) return;
      const rank = (node.status === "removed" ? 4 : 0) + (exact ? 0 : replaces.includes(q) ? 1 : name.startsWith(q) || module.startsWith(q) ? 2 : 3);
      results.push({i: i, rank: rank});
    });
    results.sort((a, b) => a.rank - b.rank || nodes[a.i].name.length - nodes[b.i].name.length);
    active = 0;
    svg.querySelectorAll("g.node.match").forEach((el) => el.classList.remove("match"));
    results.forEach((r) => { const el = element(r.i); if (el) el.classList.add("match"); });
    $("search-results").innerHTML = results.slice(0, 30).map((r, k) => {
      const node = nodes[r.i];
      return `<li role="option" data-index="${r.i}" class="${k === 0 ? "active" : ""}"><span>${text(node.name)}</span>` +
        `<span class="why">${text(node.module || node.target)} &middot; ${node.status}</span></li>`;
    }).join("") + (results.length ? "" : `<li class="why">no node matches</li>`);
    $("search-results").querySelectorAll("li[data-index]").forEach((li) => li.addEventListener("mousedown", (e) => {
      e.preventDefault(); choose(+li.dataset.index);
    }));
  }
  function choose(index) { $("search-results").innerHTML = ""; select(index, true); }
  $("search").addEventListener("input", (e) => search(e.target.value));
  $("search").addEventListener("keydown", (e) => {
    const items = $("search-results").querySelectorAll("li[data-index]");
    if (e.key === "Enter" && results.length) { e.preventDefault(); choose(results[Math.min(active, results.length - 1)].i); }
    else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      active = Math.max(0, Math.min(items.length - 1, active + (e.key === "ArrowDown" ? 1 : -1)));
      items.forEach((li, k) => li.classList.toggle("active", k === active));
    } else if (e.key === "Escape") { $("search-results").innerHTML = ""; }
  });
  $("search").addEventListener("blur", () => setTimeout(() => { $("search-results").innerHTML = ""; }, 150));

  // rewrite report
  $("report").textContent = data.report.join("\n");
  if (!data.report.length) {
    $("rewrite-list").innerHTML = data.rewrites.length ? data.rewrites.map((r, i) => rewriteHtml(i)).join("") :
      `<p class="hint">${data.is_diff ? "No rewrite recorded (pass fxreduce.inspect(..., report=result.report) for each rewrite's contract and reason)." : "One graph, no rewrite."}</p>`;
  }

  // sortable cost table, per node or per rewrite
  const columns = {
    nodes: [["name", "node", false], ["status", "status", false], ["target", "target", false],
            ["flops_before", "FLOPs before", true], ["flops_after", "FLOPs after", true], ["flops_delta", "FLOPs delta", true],
            ["params_before", "params before", true], ["params_after", "params after", true],
            ["bytes_before", "act. bytes before", true], ["bytes_after", "act. bytes after", true]],
    rewrites: [["pass", "pass", false], ["what", "rewrite", false], ["nodes", "nodes", false],
               ["flops_before", "FLOPs before", true], ["flops_after", "FLOPs after", true], ["flops_delta", "FLOPs delta", true],
               ["reduction", "reduction %", true]],
  };
  const tables = {
    nodes: nodes.map((n, i) => {
      const b = n.before || {}, a = n.after || {};
      const fb = n.status === "added" ? 0 : (n.before ? b.flops : a.flops), fa = n.status === "removed" ? 0 : a.flops;
      return {index: i, name: n.name, status: n.status, target: n.target, flops_before: fb, flops_after: fa,
              flops_delta: fa - fb, params_before: n.before ? b.params : a.params, params_after: n.status === "removed" ? 0 : a.params,
              bytes_before: n.before ? b.bytes : a.bytes, bytes_after: n.status === "removed" ? 0 : a.bytes};
    }),
    rewrites: data.rewrites.map((r, i) => ({index: null, rewrite: i, pass: r.pass, what: r.what || "", nodes: r.replaced.join(", ") + " \u2192 " + (r.added.join(", ") || "(removed)"),
      flops_before: r.flops_before, flops_after: r.flops_after, flops_delta: r.flops_after - r.flops_before, reduction: pct(r.flops_before, r.flops_after)})),
  };
  let tab = "nodes", sortKey = null, descending = false;
  function cell(key, row, numeric) {
    const value = row[key];
    if (!numeric) return `<td class="${key === "status" ? "status-" + value : ""}">${text(value === null || value === undefined ? "" : value)}</td>`;
    const cls = key.endsWith("delta") ? (value < 0 ? "down" : value > 0 ? "up" : "") : "";
    const shown = key === "reduction" ? (value === null ? "" : value.toFixed(1) + "%") : key.endsWith("delta") ? signed(value) : human(value);
    return `<td class="num ${cls}" data-value="${value === null || value === undefined ? "" : value}">${shown}</td>`;
  }
  function renderTable() {
    const cols = columns[tab];
    const rows = tables[tab].slice();
    if (sortKey) {
      const numeric = cols.find((c) => c[0] === sortKey)[2];
      rows.sort((a, b) => {
        const x = a[sortKey], y = b[sortKey];
        const order = numeric ? (x === null || x === undefined ? -Infinity : x) - (y === null || y === undefined ? -Infinity : y) : String(x).localeCompare(String(y));
        return descending ? -order : order;
      });
    }
    $("cost-table").querySelector("thead").innerHTML = "<tr>" + cols.map(([key, label, numeric]) =>
      `<th data-key="${key}" class="${numeric ? "num" : ""}" aria-sort="${key === sortKey ? (descending ? "descending" : "ascending") : "none"}">${label}</th>`).join("") + "</tr>";
    $("cost-table").querySelector("tbody").innerHTML = rows.map((row) =>
      `<tr data-index="${row.index === null ? "" : row.index}" data-rewrite="${row.rewrite === undefined ? "" : row.rewrite}">` +
      cols.map(([key, , numeric]) => cell(key, row, numeric)).join("") + "</tr>").join("");
    $("cost-table").querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
      if (sortKey === th.dataset.key) descending = !descending; else { sortKey = th.dataset.key; descending = columns[tab].find((c) => c[0] === sortKey)[2]; }
      renderTable();
    }));
    $("cost-table").querySelectorAll("tbody tr").forEach((tr) => tr.addEventListener("click", () => {
      if (tr.dataset.index !== "") { select(+tr.dataset.index, true); $("graph-pane").scrollIntoView({behavior: "smooth"}); }
      else if (tr.dataset.rewrite !== "") {
        const r = data.rewrites[+tr.dataset.rewrite];
        const name = r.added.find((n) => byName.has(n)) || r.replaced.find((n) => byName.has(n));
        if (name) { select(byName.get(name), true); $("graph-pane").scrollIntoView({behavior: "smooth"}); }
      }
    }));
  }
  function setTab(name) {
    tab = name; sortKey = null;
    $("tab-nodes").classList.toggle("active", name === "nodes");
    $("tab-rewrites").classList.toggle("active", name === "rewrites");
    renderTable();
  }
  $("tab-nodes").addEventListener("click", () => setTab("nodes"));
  $("tab-rewrites").addEventListener("click", () => setTab("rewrites"));
  if (!data.is_diff) $("tab-rewrites").disabled = true;
  renderTable();
  readable();
}());
