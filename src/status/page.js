"use strict";
// berth's status page. Everything shown comes from /admin/events and is
// written with textContent (never as HTML): pool names, backend ids, paths
// and validation messages are text whatever they contain.
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  // The admin token, once asked for: this variable only, for this tab only.
  let token = null;
  let tokenWaiter = null;
  let snap = null;
  let updates = 0;

  const CODE_NAMES = {
    "1000": "normal", "1001": "going away", "1002": "protocol error",
    "1003": "unsupported data", "1005": "no status", "abnormal": "1006 abnormal (no Close)",
    "1007": "invalid data", "1008": "policy", "1009": "too big", "1010": "extension",
    "1011": "server error", "1012": "service restart (drain)", "1013": "try again later",
    "1014": "bad gateway", "other": "other codes",
  };
  const CODE_COLORS = {
    "1000": "#2e9e57", "1001": "#3b7dd8", "abnormal": "#8a8f98", "1009": "#e08a00",
    "1012": "#8b5cf6", "1014": "#d93025", "1002": "#c2185b", "1011": "#a0522d", "other": "#b0b6c0",
  };
  const codeColor = (c) => CODE_COLORS[c] || "#5f9ea0";
  const codeName = (c) => (c === "abnormal" ? CODE_NAMES[c] : c + " " + (CODE_NAMES[c] || ""));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    return e;
  }
  function setText(node, text) {
    const t = String(text);
    if (node.textContent !== t) node.textContent = t;
  }
  function num(v) {
    if (v >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (v >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (v >= 100 || v === 0 || Number.isInteger(v)) return String(Math.round(v));
    return v.toFixed(1);
  }
  function bytes(v) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(1)) + " " + units[i];
  }
  function seconds(s) {
    return s >= 100 ? Math.round(s) + " s" : s.toFixed(1) + " s";
  }
  function clock(unix) {
    return new Date(unix * 1000).toLocaleString();
  }
  function pct(share) {
    return Math.round(share * 100) + "%";
  }

  // Children kept by key, so that rows and buttons survive updates.
  function keyed(parent, key, make) {
    if (!parent.kids) parent.kids = new Map();
    let node = parent.kids.get(key);
    if (!node) {
      node = make();
      parent.kids.set(key, node);
      parent.appendChild(node);
    }
    node.seen = true;
    return node;
  }
  function sweep(parent) {
    if (!parent.kids) return;
    for (const [key, node] of parent.kids) {
      if (!node.seen) { node.remove(); parent.kids.delete(key); }
      node.seen = false;
    }
  }

  function notice(kind, text) {
    const n = $("notice");
    n.hidden = false;
    n.className = "notice " + kind;
    n.textContent = text;
  }

  // --- actions -----------------------------------------------------------

  function askToken(then) {
    tokenWaiter = then;
    $("token-box").hidden = false;
    $("token-input").focus();
  }
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token-input").value;
    $("token-input").value = "";
    $("token-box").hidden = true;
    const then = tokenWaiter;
    tokenWaiter = null;
    if (then) then();
  });
  $("token-cancel").addEventListener("click", () => {
    tokenWaiter = null;
    $("token-box").hidden = true;
  });

  async function post(path, what, describe) {
    if (snap && snap.token_required && token === null) {
      askToken(() => post(path, what, describe));
      return;
    }
    const headers = {};
    if (token !== null) headers["Authorization"] = "Bearer " + token;
    let resp, text;
    try {
      resp = await fetch(path, { method: "POST", headers, cache: "no-store" });
      text = await resp.text();
    } catch (err) {
      notice("error", what + ": " + err);
      return;
    }
    if (resp.status === 401) {
      token = null;
      notice("error", what + ": the admin token was refused; enter it again.");
      askToken(() => post(path, what, describe));
      return;
    }
    if (!resp.ok) {
      notice("error", what + " failed (" + resp.status + "):\n" + text.trim());
      return;
    }
    let body = null;
    try { body = JSON.parse(text); } catch (err) { body = null; }
    notice("ok", describe(body));
  }

  function backendPath(pool, id, action) {
    return "/admin/pools/" + encodeURIComponent(pool) + "/backends/" +
      encodeURIComponent(id) + "/" + action;
  }

  function drainAction(pool, id, drain) {
    const action = drain ? "drain" : "undrain";
    post(backendPath(pool, id, action), action + " " + pool + "/" + id, (b) => {
      if (!b) return action + " " + pool + "/" + id + ": done";
      const change = b.changed ? "now " + b.state : "already " + b.state;
      return action + " " + pool + "/" + id + ": " + change + ", " + b.live_connections + " live";
    });
  }

  $("reload-btn").addEventListener("click", () => {
    post("/admin/reload", "Reload", (b) => {
      const words = (b && b.summary) || [];
      return words.length ? "Reloaded:\n" + words.join("\n") : "Reloaded: nothing changed.";
    });
  });

  // --- rendering ---------------------------------------------------------

  function renderProcess(s) {
    setText($("version"), s.version + " (" + s.commit + ")");
    setText($("config"), s.config === null ? "(none: started without a file)" : s.config);
    const p = s.process;
    setText($("p-conns"), num(p.connections_open));
    setText($("p-ws"), p.websockets_open + " live WebSockets");
    if (p.fds) {
      setText($("p-fds"), p.fds.open + " / " + p.fds.limit);
      $("p-fds-bar").style.width = Math.min(100, (100 * p.fds.open) / Math.max(1, p.fds.limit)) + "%";
      setText($("p-fds-note"), p.fds.headroom + " left before new clients are refused (" + p.fds.reserve + " kept in reserve)");
    } else {
      setText($("p-fds"), "n/a");
      setText($("p-fds-note"), "not available on this system");
    }
    setText($("p-tls"), num(p.tls.handshakes_per_second) + " /s");
    setText($("p-tls-share"), p.tls.resumed_share === null
      ? "no successful handshakes in the last 60 s"
      : pct(p.tls.resumed_share) + " resumed (last 60 s)");
    const r = s.last_reload;
    const result = $("r-result");
    setText(result, r.result === "success" ? (r.initial ? "loaded at startup" : "reloaded") : "reload rejected");
    result.className = "big " + r.result;
    setText($("r-time"), clock(r.time) + (r.result === "failure" ? ": the running config stays in force" : ""));
    fillList($("r-changes"), r.changes.length || r.initial || r.result === "failure" ? r.changes : ["nothing changed"]);
    fillList($("r-messages"), r.messages);
  }

  function fillList(ul, items) {
    const joined = items.join("\n");
    if (ul.joined === joined) return;
    ul.joined = joined;
    ul.replaceChildren(...items.map((t) => el("li", "", t)));
  }

  function renderDrains(s) {
    const list = $("drain-list");
    $("drains").hidden = s.drains.length === 0;
    for (const d of s.drains) {
      const row = keyed(list, d.pool + "\u0000" + d.backend, () => {
        const r = el("div", "drain-row");
        r.who = el("div", "who", d.pool + " / " + d.backend);
        r.bar = el("div", "bar");
        r.fill = el("div", "fill");
        r.bar.appendChild(r.fill);
        r.text = el("div", "small");
        r.append(r.who, r.bar, r.text);
        r.dataset.pool = d.pool;
        r.dataset.backend = d.backend;
        return r;
      });
      const share = d.total === 0 ? 1 : d.closed / d.total;
      row.fill.style.width = Math.round(share * 100) + "%";
      row.classList.toggle("finished", d.finished);
      row.dataset.closed = d.closed;
      row.dataset.total = d.total;
      setText(row.text, d.closed + " of " + d.total + " closed · " +
        (d.finished ? "done" : seconds(d.remaining_seconds) + " left of " + seconds(d.window_seconds)));
    }
    sweep(list);
  }

  const COLUMNS = [
    ["Backend", ""], ["Address", ""], ["State", ""], ["Health", ""], ["Weight", "num"],
    ["Live WebSockets", ""], ["Upgrades/s", "num"],
    ["Msgs/s →", "num"], ["Msgs/s ←", "num"], ["Bytes/s →", "num"], ["Bytes/s ←", "num"], ["", ""],
  ];

  function makePool(name) {
    const sec = el("section", "pool");
    sec.dataset.pool = name;
    const head = el("header");
    sec.heading = el("h2", "", name);
    sec.balance = el("span", "tag");
    sec.affinity = el("span", "tag");
    sec.live = el("span", "tag");
    head.append(sec.heading, sec.balance, sec.affinity, sec.live);
    const wrap = el("div", "tablewrap");
    const table = el("table");
    const tr = el("tr");
    for (const [label, cls] of COLUMNS) tr.appendChild(el("th", cls, label));
    table.appendChild(el("thead")).appendChild(tr);
    sec.rows = el("tbody");
    table.appendChild(sec.rows);
    wrap.appendChild(table);
    sec.closes = el("div", "closes");
    sec.append(head, wrap, sec.closes);
    return sec;
  }

  function makeRow(pool, id) {
    const tr = el("tr");
    tr.dataset.pool = pool;
    tr.dataset.backend = id;
    const cell = (cls) => tr.appendChild(el("td", cls));
    tr.idCell = cell("id");
    tr.idCell.textContent = id;
    tr.addr = cell("addr");
    tr.stateCell = cell("");
    tr.state = tr.stateCell.appendChild(el("span", "state"));
    tr.note = tr.stateCell.appendChild(el("span", "note"));
    tr.health = cell("health");
    tr.weight = cell("num weight");
    const live = cell("live");
    tr.count = live.appendChild(el("span", "count"));
    tr.bar = live.appendChild(el("div", "bar"));
    tr.fill = tr.bar.appendChild(el("div", "fill"));
    tr.mark = tr.bar.appendChild(el("div", "mark"));
    tr.upgrades = cell("num upgrades");
    tr.msgIn = cell("num msgs-in");
    tr.msgOut = cell("num msgs-out");
    tr.bytesIn = cell("num bytes-in");
    tr.bytesOut = cell("num bytes-out");
    const actions = cell("actions").appendChild(el("div"));
    tr.drain = actions.appendChild(el("button", "drain", "Drain"));
    tr.undrain = actions.appendChild(el("button", "undrain", "Undrain"));
    tr.drain.type = tr.undrain.type = "button";
    tr.drain.addEventListener("click", () => drainAction(pool, id, true));
    tr.undrain.addEventListener("click", () => drainAction(pool, id, false));
    return tr;
  }

  function renderPools(s) {
    const main = $("pools");
    for (const name of Object.keys(s.pools)) {
      const pool = s.pools[name];
      const sec = keyed(main, name, () => makePool(name));
      setText(sec.balance, "balance: " + pool.balance);
      setText(sec.affinity, "affinity: " + pool.affinity);
      // A tag only for a pool with authentication (made and removed as a
      // reload turns it on and off).
      const auth = pool.auth || [];
      if (auth.length > 0 && !sec.auth) {
        sec.auth = el("span", "tag");
        sec.live.before(sec.auth);
      } else if (auth.length === 0 && sec.auth) {
        sec.auth.remove();
        sec.auth = null;
      }
      if (sec.auth) setText(sec.auth, "auth: " + auth.join(", "));
      setText(sec.live, pool.live_connections + " live");
      // Room past the fullest bar and the furthest share mark.
      let scale = 1;
      for (const b of pool.backends) {
        scale = Math.max(scale, b.live_connections, b.weighted_share * pool.live_connections);
      }
      scale *= 1.15;
      for (const b of pool.backends) {
        const tr = keyed(sec.rows, b.id, () => makeRow(name, b.id));
        setText(tr.addr, b.address);
        setText(tr.state, b.state);
        tr.state.className = "state " + b.state;
        // Why it is in that state, when it says more than the state does.
        const notes = [];
        if (b.slow_start !== null) notes.push("slow start " + pct(b.slow_start));
        if (b.drained_by.includes("config")) notes.push("drain = true");
        if (b.shedding) notes.push("rebalancing");
        if (b.discovered) notes.push("dns");
        setText(tr.note, notes.join(", "));
        setText(tr.health, b.healthy ? "healthy" : "failing");
        setText(tr.weight, b.weight + (b.max_connections === null ? "" : " (max " + b.max_connections + ")"));
        setText(tr.count, b.live_connections);
        const expected = b.weighted_share * pool.live_connections;
        tr.fill.style.width = (100 * b.live_connections) / scale + "%";
        tr.mark.style.left = (100 * expected) / scale + "%";
        tr.mark.hidden = b.weighted_share === 0;
        tr.bar.title = b.live_connections + " live; weighted share " + pct(b.weighted_share) +
          " of " + pool.live_connections + " = " + expected.toFixed(1);
        setText(tr.upgrades, num(b.upgrades_per_second));
        setText(tr.msgIn, num(b.messages_per_second.client_to_backend));
        setText(tr.msgOut, num(b.messages_per_second.backend_to_client));
        setText(tr.bytesIn, bytes(b.bytes_per_second.client_to_backend));
        setText(tr.bytesOut, bytes(b.bytes_per_second.backend_to_client));
        tr.drain.disabled = b.state === "draining";
        tr.undrain.disabled = b.state !== "draining";
      }
      sweep(sec.rows);
      renderCloses(sec.closes, pool.closes);
    }
    sweep(main);
  }

  // A stacked bar chart of closes by code: one bar per bucket, oldest left.
  function renderCloses(box, closes) {
    const codes = Object.keys(closes.by_code);
    const key = JSON.stringify(closes.by_code);
    if (box.key === key) return;
    box.key = key;
    const n = closes.window_seconds / closes.bucket_seconds;
    const W = 480, H = 110, top = 14, bottom = 18, left = 30;
    const bw = (W - left - 4) / n;
    let max = 1;
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (const c of codes) sum += closes.by_code[c][i];
      max = Math.max(max, sum);
    }
    const chart = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    const label = svg("title", {});
    label.textContent = "Connection closes by code over the last five minutes";
    chart.appendChild(label);
    const text = (x, y, t, anchor) => {
      const e = svg("text", { x, y, "font-size": 10, fill: "#667085", "text-anchor": anchor || "start" });
      e.textContent = t;
      chart.appendChild(e);
    };
    chart.appendChild(svg("line", { x1: left, y1: H - bottom, x2: W - 4, y2: H - bottom, stroke: "#c9ced6" }));
    text(left - 4, top + 4, String(max), "end");
    text(left - 4, H - bottom, "0", "end");
    text(left, H - 4, "−5 min");
    text(W - 4, H - 4, "now", "end");
    const plot = H - top - bottom;
    for (let i = 0; i < n; i++) {
      let y = H - bottom;
      for (const c of codes) {
        const v = closes.by_code[c][i];
        if (!v) continue;
        const h = (plot * v) / max;
        y -= h;
        const r = svg("rect", { x: left + i * bw + 1, y, width: Math.max(1, bw - 2), height: h, fill: codeColor(c) });
        const tip = svg("title", {});
        tip.textContent = codeName(c) + ": " + v;
        r.appendChild(tip);
        chart.appendChild(r);
      }
    }
    const legend = el("div", "legend");
    legend.appendChild(el("div", "small", "Closes, last 5 min"));
    if (codes.length === 0) legend.appendChild(el("div", "small", "none"));
    for (const c of codes) {
      const row = el("div", "code");
      row.dataset.code = c;
      const sw = el("span", "sw");
      sw.style.background = codeColor(c);
      row.append(sw, document.createTextNode(codeName(c) + ": " + closes.totals[c]));
      legend.appendChild(row);
    }
    box.replaceChildren(chart, legend);
  }

  function render() {
    renderProcess(snap);
    renderDrains(snap);
    renderPools(snap);
    updates++;
    document.body.dataset.updates = String(updates);
  }

  // --- the live feed -----------------------------------------------------

  const conn = $("conn");
  // EventSource reconnects by itself after a dropped stream, but gives up
  // after a refusal (a 503 when too many streams are open): then the page
  // opens a new one after a pause.
  const connect = () => {
    const events = new EventSource("/admin/events");
    events.onopen = () => { conn.className = "conn live"; };
    events.onerror = () => {
      conn.className = "conn lost";
      if (events.readyState === EventSource.CLOSED) {
        conn.textContent = "disconnected; trying again in 5 s…";
        setTimeout(connect, 5000);
      } else {
        conn.textContent = "disconnected; reconnecting…";
      }
    };
    events.onmessage = (e) => {
      try {
        snap = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      conn.className = "conn live";
      conn.textContent = "live · " + new Date(snap.time * 1000).toLocaleTimeString();
      render();
    };
  };
  connect();
})();
