// pgfleet web UI: charts (uPlot) from each page's JSON twin, sortable and
// filterable tables, the range form.  Data never goes into the page as
// markup: textContent and DOM nodes only.
"use strict";

(function () {
  const COLORS = ["#2f6fdf", "#e0672b", "#2a9d5c", "#b8336a", "#7a5cc4", "#c29b1d", "#3aa6b9", "#666"];

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function withParams(url, params) {
    const u = new URL(url, window.location.href);
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
    return u.pathname + u.search;
  }

  function fmt(v, unit) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (unit === "B/s" || unit === "B") {
      const units = ["B", "kB", "MB", "GB", "TB"];
      let i = 0, x = v;
      while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i++; }
      return x.toFixed(i ? 1 : 0) + " " + units[i] + (unit === "B/s" ? "/s" : "");
    }
    let s;
    if (a >= 1e9) s = (v / 1e9).toFixed(1) + "G";
    else if (a >= 1e6) s = (v / 1e6).toFixed(1) + "M";
    else if (a >= 1e3) s = (v / 1e3).toFixed(1) + "k";
    else if (a >= 10 || a === 0) s = v.toFixed(0);
    else s = v.toPrecision(2);
    return unit ? s + " " + unit : s;
  }

  // Settings changes as dashed vertical lines.
  function markersPlugin(markers) {
    return {
      hooks: {
        draw: [u => {
          if (!markers.length) return;
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#d33";
          ctx.setLineDash([4, 3]);
          ctx.lineWidth = 1;
          for (const m of markers) {
            const x = Math.round(u.valToPos(m.t, "x", true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
  }

  // Backups (the server page's "backups" part) as bands from their start to
  // their end (now, for one in progress) under the series, edged with solid
  // lines on top, coloured by state.  Only the part within the chart's range
  // is drawn.
  const BACKUP_COLORS = { valid: "#00a651", invalid: "#c8102e", in_progress: "#f0a500" };
  const BACKUP_OTHER = "#8a8f98";

  function backupColor(state) {
    return Object.prototype.hasOwnProperty.call(BACKUP_COLORS, state) ? BACKUP_COLORS[state] : BACKUP_OTHER;
  }

  function backupEnd(b) {
    return b.end === null ? Math.max(b.start, Date.now() / 1000) : b.end;
  }

  function backupWithin(b, min, max) {
    return backupEnd(b) >= min && b.start <= max;
  }

  // The pixels [left, right] of a backup on the chart, or null when it lies outside.
  function backupSpan(u, b) {
    const min = u.scales.x.min, max = u.scales.x.max;
    if (min === null || max === null || min === undefined || max === undefined) return null;
    if (!backupWithin(b, min, max)) return null;
    const end = backupEnd(b);
    const left = Math.round(u.valToPos(Math.max(b.start, min), "x", true));
    const right = Math.round(u.valToPos(Math.min(end, max), "x", true));
    return [left, Math.max(right, left + 1)];
  }

  function backupsPlugin(backups) {
    function each(u, fn) {
      if (!backups.length) return;
      const ctx = u.ctx;
      ctx.save();
      for (const b of backups) {
        const span = backupSpan(u, b);
        if (span) fn(ctx, b, span[0], span[1]);
      }
      ctx.restore();
    }
    return {
      hooks: {
        drawClear: [u => each(u, (ctx, b, left, right) => {
          ctx.fillStyle = backupColor(b.state) + "26";
          ctx.fillRect(left, u.bbox.top, right - left, u.bbox.height);
        })],
        draw: [u => each(u, (ctx, b, left, right) => {
          ctx.strokeStyle = backupColor(b.state);
          ctx.lineWidth = 2;
          ctx.setLineDash([]);
          for (const x of (right - left > 2 ? [left, right] : [left])) {
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
        })],
      },
    };
  }

  // A y axis as wide as its longest label ("0.0010 cores"), 80 pixels at
  // least; uPlot's own autosize recipe, converging after one more cycle.
  function axisSize(u, values, axisIdx, cycleNum) {
    const axis = u.axes[axisIdx];
    if (cycleNum > 1) return axis._size;
    let size = axis.ticks.size + axis.gap;
    const longest = (values || []).reduce((acc, v) => (v.length > acc.length ? v : acc), "");
    if (longest !== "") {
      u.ctx.font = axis.font[0];
      size += u.ctx.measureText(longest).width / devicePixelRatio;
    }
    return Math.max(80, Math.ceil(size));
  }

  function zoomTo(from, to) {
    const u = new URL(window.location.href);
    u.searchParams.delete("range");
    u.searchParams.set("from", Math.floor(from));
    u.searchParams.set("to", Math.ceil(to));
    window.location.href = u.pathname + u.search;
  }

  function drawChart(container, spec, x, markers, backups) {
    const box = el("div", "chart");
    box.dataset.chart = spec.id;
    box.appendChild(el("h3", null, spec.title));
    if (spec.note) box.appendChild(el("p", "note", spec.note));
    container.appendChild(box);
    const width = Math.max(300, box.clientWidth - 16);
    const series = spec.series.filter(s => s.values.some(v => v !== null));
    if (!series.length) {
      box.appendChild(el("p", "empty", "No data in this range."));
      box.dataset.empty = "1";
      return null;
    }
    const units = [];
    for (const s of series) if (!units.includes(s.unit)) units.push(s.unit);
    const scaleOf = unit => (units.indexOf(unit) === 0 ? "y" : "y2");
    const opts = {
      width: width,
      height: 200,
      cursor: { drag: { x: true, y: false, setScale: false } },
      select: { show: true },
      legend: { live: true },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] },
                y2: { range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] } },
      axes: [
        {},
        { scale: "y", size: axisSize, values: (u, vals) => vals.map(v => fmt(v, units[0])) },
      ],
      series: [{ value: (u, v) => (v === null ? "–" : new Date(v * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC") }],
      plugins: [backupsPlugin(backups), markersPlugin(markers)],
      hooks: {
        setSelect: [u => {
          if (u.select.width < 5) return;
          const from = u.posToVal(u.select.left, "x");
          const to = u.posToVal(u.select.left + u.select.width, "x");
          zoomTo(from, to);
        }],
      },
    };
    if (units.length > 1) {
      opts.axes.push({ scale: "y2", side: 1, size: axisSize, grid: { show: false },
                       values: (u, vals) => vals.map(v => fmt(v, units[1])) });
    }
    const data = [x];
    series.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      opts.series.push({
        label: s.label, scale: scaleOf(s.unit), stroke: color, width: 1.5,
        fill: series.length === 1 ? color + "22" : undefined,
        value: (u, v) => fmt(v, s.unit), spanGaps: false,
        // A lone value draws no line: show the points when there are few.
        points: { show: s.values.filter(v => v !== null).length < 40, size: 5, fill: color },
      });
      data.push(s.values);
    });
    const plot = new uPlot(opts, data, box);
    return plot;
  }

  async function loadCharts(section) {
    const src = withParams(section.dataset.src, { _only: "charts,markers,backups" });
    let data;
    try {
      const resp = await fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      data = await resp.json();
    } catch (e) {
      section.replaceChildren(el("p", "error", "Could not load the charts: " + e.message));
      return;
    }
    section.replaceChildren();
    const markers = (data.markers || []).map(m => ({ t: Date.parse(m.ts) / 1000, name: m.name }));
    const backups = (data.backups || [])
      .map(b => ({ start: Date.parse(b.started) / 1000,
                   end: b.finished ? Date.parse(b.finished) / 1000 : null, state: String(b.state) }))
      .filter(b => Number.isFinite(b.start) && (b.end === null || Number.isFinite(b.end)));
    let drawn = 0;
    for (const spec of data.charts || []) {
      if (drawChart(section, spec, data.x, markers, backups)) drawn++;
    }
    // What the charts mark (their x range is the buckets'), for whoever checks.
    const x = data.x || [];
    const marked = drawn && x.length ? backups.filter(b => backupWithin(b, x[0], x[x.length - 1])).length : 0;
    document.body.dataset.backupsMarked = String(marked);
    document.body.dataset.chartsDrawn = String(drawn);
  }

  // -- Fleet: sparklines, sort, filter

  async function loadSparklines(table) {
    const src = withParams(table.dataset.src, { _only: "load" });
    const resp = await fetch(src, { credentials: "same-origin" });
    if (!resp.ok) return;
    const data = await resp.json();
    let drawn = 0;
    for (const row of table.tBodies[0].rows) {
      const load = (data.load || {})[row.dataset.srvid];
      for (const cell of row.querySelectorAll("td.spark")) {
        const values = load ? load[cell.dataset.series] : null;
        if (!values || !values.some(v => v !== null)) { cell.textContent = "–"; continue; }
        const last = values.filter(v => v !== null).pop();
        new uPlot({
          width: 110, height: 28, cursor: { show: false }, legend: { show: false },
          scales: { x: { time: false }, y: { range: (u, min, max) => [0, max > 0 ? max : 1] } },
          axes: [{ show: false }, { show: false }],
          series: [{}, { stroke: "#2f6fdf", fill: "#2f6fdf22", width: 1 }],
        }, [data.x, values.map(v => (v === null ? 0 : v))], cell);
        cell.appendChild(el("span", "spark-value", fmt(last)));
        drawn++;
      }
    }
    document.body.dataset.chartsDrawn = String(drawn);
  }

  function sortable(table) {
    const heads = table.tHead.rows[0].cells;
    Array.from(heads).forEach((th, col) => {
      if (!th.dataset.sort) return;
      th.classList.add("clickable");
      th.addEventListener("click", () => {
        const asc = th.dataset.dir !== "asc";
        Array.from(heads).forEach(h => delete h.dataset.dir);
        th.dataset.dir = asc ? "asc" : "desc";
        const rows = Array.from(table.tBodies[0].rows);
        const key = r => {
          const c = r.cells[col];
          const v = c ? (c.dataset.value !== undefined ? c.dataset.value : c.textContent) : "";
          return th.dataset.sort === "num" ? parseFloat(v) || 0 : v.toLowerCase();
        };
        rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (asc ? 1 : -1));
        for (const r of rows) table.tBodies[0].appendChild(r);
      });
    });
  }

  function filterable(input, table) {
    input.addEventListener("input", () => {
      const q = input.value.trim().toLowerCase();
      for (const r of table.tBodies[0].rows) {
        r.hidden = q !== "" && !r.textContent.toLowerCase().includes(q);
      }
    });
  }

  // -- The range form: datetime-local fields are read as UTC.

  function rangeForm(form) {
    form.addEventListener("submit", () => {
      for (const name of ["from", "to"]) {
        const local = form.elements[name + "_local"];
        if (local && local.value) form.elements[name].value = Math.floor(Date.parse(local.value + ":00Z") / 1000);
        if (local) local.disabled = true;
      }
      // The top queries' sort and whether they show pgfleet's own statements.
      const here = new URL(window.location.href).searchParams;
      for (const name of ["sort", "own"]) {
        const value = here.get(name);
        if (value && !form.elements[name]) {
          const h = document.createElement("input");
          h.type = "hidden"; h.name = name; h.value = value;
          form.appendChild(h);
        }
      }
    });
  }

  // -- Index advice and plans: asked for with a POST; a run under way is
  // polled (the page's JSON twin) until it is over, then the page reloads.

  function followRun(section) {
    if (section.dataset.state !== "running") return;
    const src = withParams(section.dataset.src, { _only: "run" });
    const elapsed = document.getElementById("advice-elapsed");
    const since = Date.now() - 1000 * (parseFloat(elapsed ? elapsed.textContent : "0") || 0);
    const tick = setInterval(() => {
      if (elapsed) elapsed.textContent = String(Math.round((Date.now() - since) / 1000));
    }, 1000);
    async function poll() {
      try {
        const resp = await fetch(src, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (resp.ok) {
          const run = (await resp.json()).run;
          if (!run || String(run.id) !== section.dataset.run || run.state !== "running") {
            clearInterval(tick);
            window.location.reload();
            return;
          }
        }
      } catch (e) {
        // The network or the server hiccupped: ask again.
      }
      setTimeout(poll, 2000);
    }
    setTimeout(poll, 2000);
  }

  function submitOnce(form) {
    form.addEventListener("submit", () => {
      for (const b of form.querySelectorAll("button")) {
        b.disabled = true;
        b.textContent = "Working…";
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const run = document.getElementById("advice-run");
    if (run) followRun(run);
    for (const id of ["advice-form", "explain-form"]) {
      const f = document.getElementById(id);
      if (f) submitOnce(f);
    }
    const form = document.getElementById("range-form");
    if (form) rangeForm(form);
    const charts = document.getElementById("charts");
    if (charts && window.uPlot) loadCharts(charts);
    const fleet = document.getElementById("fleet");
    if (fleet) {
      sortable(fleet);
      const filter = document.getElementById("filter");
      if (filter) filterable(filter, fleet);
      if (window.uPlot) loadSparklines(fleet);
    }
  });
})();
