// Volt's live view: draws the snapshot Volt sends on /ui/events (server-sent events).
// Every event carries the whole snapshot, so drawing is a function of the last one.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PHASES = ["booting", "booted", "new", "detached"];
const PHASE_TEXT = { booting: "booting", booted: "booted", new: "not started", detached: "detached" };
let last = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c);
  }
  return node;
}

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i && n < 10 ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}

function bar(fromOrigin, fromParents) {
  const total = fromOrigin + fromParents;
  const b = el("div", { class: "bar", title: size(fromOrigin) + " from the origin, " + size(fromParents) + " from parents" });
  if (total > 0) {
    b.append(el("div", { class: "o" }), el("div", { class: "p" }));
    b.children[0].style.width = (100 * fromOrigin / total) + "%";
    b.children[1].style.width = (100 * fromParents / total) + "%";
  }
  return b;
}

function hostCard(image, h) {
  const vms = el("div", { class: "vms" });
  for (const p of PHASES) {
    if (h.vms[p]) vms.append(el("span", { class: "vm " + p, title: h.vms[p] + " VMs " + PHASE_TEXT[p], "data-phase": p }, String(h.vms[p]) + " " + PHASE_TEXT[p]));
  }
  return el("div", {
      class: "host " + h.health, "data-host": h.name, "data-image": image,
      "data-level": String(h.level), "data-parents": h.parents.join(","), "data-health": h.health },
    el("div", { class: "name" }, el("span", { class: "dot " + h.health, title: "heartbeat " + (h.health === "ok" ? "on time" : "late") }), h.name),
    el("div", { class: "parents", title: "parents, best first" }, "↑ " + h.parents.join(", ")),
    bar(h.from_origin, h.from_parents),
    el("div", { class: "nums" },
      el("b", { class: "o" }, size(h.from_origin)), " origin · ",
      el("b", { class: "p" }, size(h.from_parents)), " parents"),
    vms);
}

function imagePanel(img) {
  const tree = el("div", { class: "tree", "data-tree": img.name });
  tree.append(el("div", { class: "level", "data-level": "0" },
    el("span", { class: "label" }, "origin"),
    el("div", { class: "hosts" }, el("div", { class: "host origin", "data-node": "origin" }, "origin"))));
  const levels = new Map();
  for (const h of img.hosts) {
    if (!levels.has(h.level)) levels.set(h.level, []);
    levels.get(h.level).push(h);
  }
  for (const level of [...levels.keys()].sort((a, b) => a - b)) {
    const row = el("div", { class: "hosts" });
    for (const h of levels.get(level)) row.append(hostCard(img.name, h));
    tree.append(el("div", { class: "level", "data-level": String(level) }, el("span", { class: "label" }, "level " + level), row));
  }
  if (!img.hosts.length) tree.append(el("p", { class: "empty" }, "no host relays this image yet"));
  const total = img.from_origin + img.from_parents;
  const share = total ? Math.round(100 * img.from_parents / total) + "% from parents" : "nothing fetched yet";
  return el("section", { class: "image", "data-image": img.name },
    el("div", { class: "image-head" },
      el("h2", {}, img.name),
      el("span", { class: "facts" }, size(img.size) + " · " + img.hosts.length + " hosts · depth " + img.depth +
        " · fan-out " + img.fanout + " · " + img.parents_per_node + " parents per host")),
    el("div", { class: "bytes" },
      el("span", {}, "fetched by the hosts: " + size(img.from_origin) + " from the origin, " + size(img.from_parents) + " from parents (" + share + ")"),
      bar(img.from_origin, img.from_parents)),
    tree);
}

// Lines from each host up to its parents, drawn once the cards are laid out.
function drawEdges(tree) {
  const old = tree.querySelector("svg.edges");
  if (old) old.remove();
  const box = tree.getBoundingClientRect();
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "edges");
  svg.setAttribute("width", box.width);
  svg.setAttribute("height", box.height);
  const nodes = new Map();
  for (const n of tree.querySelectorAll("[data-host], [data-node]")) nodes.set(n.dataset.host || n.dataset.node, n.getBoundingClientRect());
  for (const card of tree.querySelectorAll("[data-host]")) {
    const me = nodes.get(card.dataset.host);
    card.dataset.parents.split(",").forEach((p, i) => {
      const up = nodes.get(p);
      if (!up) return;
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("class", "edge " + (i === 0 ? "primary" : "backup"));
      line.setAttribute("x1", up.left + up.width / 2 - box.left);
      line.setAttribute("y1", up.bottom - box.top);
      line.setAttribute("x2", me.left + me.width / 2 - box.left);
      line.setAttribute("y2", me.top - box.top);
      svg.append(line);
    });
  }
  tree.prepend(svg);
}

function render(snap) {
  last = snap;
  const images = document.getElementById("images");
  images.replaceChildren(...(snap.images.length ? snap.images.map(imagePanel) : [el("p", { class: "empty" }, "no image registered")]));
  for (const tree of images.querySelectorAll(".tree")) drawEdges(tree);
  document.getElementById("repairs").textContent = snap.repairs + " repairs";
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.getElementById("changes").replaceChildren(...snap.changes.map(c =>
    el("li", {}, el("time", {}, new Date(c.time * 1000).toLocaleTimeString()), c.text)));
  const idle = snap.agents.filter(a => !a.images.length);
  document.getElementById("idle-title").hidden = !idle.length;
  document.getElementById("idle").replaceChildren(...idle.map(a => el("li", { "data-idle": a.name }, a.name + " (" + a.health + ")")));
  document.body.dataset.version = String(snap.version);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/ui/events");
  const onSnapshot = e => render(JSON.parse(e.data));
  source.addEventListener("snapshot", onSnapshot);
  source.addEventListener("change", onSnapshot);
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn live"; };
  // EventSource reconnects by itself (Volt's stream says within 1 s).
  source.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn connecting"; };
}

window.addEventListener("resize", () => { if (last) render(last); });
connect();
