// heed labelling page: keyboard shortcuts over a form that also works without this script.
// 1/← and 2/→ choose, 3/↑ tie, 4 both bad, 0/↓ skip, Enter submits, u undoes, c comments,
// g opens and closes the guidelines. Spans items: see spanMarker.
(function () {
  "use strict";
  const form = document.getElementById("answer-form");
  const undo = document.getElementById("undo-form");
  const hint = document.getElementById("hint");
  const kind = form ? form.dataset.kind : null;
  const n = form ? Number(form.dataset.n) : 0;
  let sent = false;

  function unskip() {
    const box = form.querySelector('input[type="checkbox"][name="choice"]');
    if (box) box.checked = false;
  }
  function check(name, value) {
    const input = form.querySelector(`input[name="${name}"][value="${value}"]`);
    if (!input) return;
    if (name !== "choice") unskip();
    input.checked = input.type === "checkbox" ? !input.checked : true;
    refresh();
  }
  function checked(name) {
    const input = form.querySelector(`input[name="${name}"]:checked`);
    return input ? input.value : null;
  }
  function selects() { return Array.from(form.querySelectorAll("select[name^=rank_]")); }

  // Ranking by key: each press gives the next rank to that response.
  function rankNext(pos) {
    const all = selects();
    if (pos >= all.length || all[pos].value) return;
    const used = all.filter((s) => s.value).length;
    all[pos].value = String(used + 1);
    unskip();
    refresh();
  }
  function rankBack() {
    const all = selects().filter((s) => s.value);
    if (!all.length) return;
    all.sort((a, b) => Number(b.value) - Number(a.value))[0].value = "";
    refresh();
  }
  function rankingComplete() {
    const values = selects().map((s) => Number(s.value)).filter((v) => v > 0).sort((a, b) => a - b);
    return values.length === n && values.every((v, i) => v === i + 1);
  }

  function skipping() { return checked("choice") === "skip"; }
  function filled(id) { const field = document.getElementById(id); return field && field.value.trim() !== ""; }
  function ready() {
    if (skipping()) return true;
    if (kind === "pair") return checked("choice") !== null;
    if (kind === "thumbs") return checked("label") !== null;
    if (kind === "rating") return checked("score") !== null;
    if (kind === "spans") return filled("spans") || filled("correction");
    return rankingComplete();
  }
  function say(text) { if (hint) hint.textContent = text; }

  // Spans: the response as code points, the spans tagged so far, a caret and a selection.
  // Offsets are code points into the response as the server holds it (Python string
  // indices), never the UTF-16 units of JavaScript strings: each piece of the rendered
  // text says where it starts (data-at), and each mark of a hidden character stands for
  // the one code point it names (data-cp), whatever its own text. The spans travel in the
  // same "START-END LABEL" lines a page without this script has people type.
  function spanMarker() {
    const box = document.getElementById("spantext");
    const field = document.getElementById("spans");
    const list = document.getElementById("span-list");
    if (!box || !field || !list) return null;
    const labels = Array.from(form.querySelectorAll(".tagbtn")).map((b) => b.dataset.label);
    const chars = [];
    const marks = new Map();  // code point index -> its mark's text and title
    let consistent = true;
    box.querySelectorAll("[data-at]").forEach((el) => {
      if (Number(el.dataset.at) !== chars.length) consistent = false;
      if (el.dataset.cp) {
        marks.set(chars.length, { text: el.textContent, title: el.title });
        chars.push(String.fromCodePoint(parseInt(el.dataset.cp, 16)));
      } else {
        for (const c of el.textContent) chars.push(c);  // for..of walks code points
      }
    });
    // Anything else (a page changed on the way) would put spans in the wrong place: typed lines instead.
    if (!consistent || chars.length !== Number(box.dataset.chars)) return null;
    const n = chars.length;
    const WORD = /[\p{L}\p{N}_]/u;
    let spans = [];
    let caret = 0;
    let anchor = null;  // where a selection began; it runs to the caret

    function selection() {
      return anchor === null || anchor === caret ? null : [Math.min(anchor, caret), Math.max(anchor, caret)];
    }
    function excerpt(s) {
      const text = chars.slice(s.start, s.end).map((c, i) => (marks.has(s.start + i) ? `⟨${marks.get(s.start + i).text}⟩` : c)).join("");
      return text.length > 80 ? text.slice(0, 77) + "…" : text;
    }
    // Everything is built from text nodes and attributes: model output never passes through HTML.
    function render() {
      const sel = selection();
      const cuts = new Set([0, n, caret]);
      if (sel) sel.forEach((i) => cuts.add(i));
      spans.forEach((s) => { cuts.add(s.start); cuts.add(s.end); });
      marks.forEach((_, i) => { cuts.add(i); cuts.add(i + 1); });
      const at = Array.from(cuts).sort((a, b) => a - b);
      const parts = document.createDocumentFragment();
      let k = 0;
      for (let j = 0; j + 1 < at.length; j++) {
        const a = at[j];
        const b = at[j + 1];
        const el = document.createElement("span");
        el.dataset.at = String(a);
        if (marks.has(a)) {
          el.className = "cf";
          el.textContent = marks.get(a).text;
          el.title = marks.get(a).title;
          el.dataset.cp = chars[a].codePointAt(0).toString(16).toUpperCase();
        } else {
          el.textContent = chars.slice(a, b).join("");
        }
        while (k < spans.length && spans[k].end <= a) k++;
        const s = spans[k];
        if (s && s.start <= a && b <= s.end) {
          el.classList.add("tagged", "l" + (labels.indexOf(s.label) + 1));
          if (b === s.end) { el.classList.add("last"); el.dataset.label = s.label; }
        }
        if (sel && sel[0] <= a && b <= sel[1]) el.classList.add("sel");
        if (a === caret) el.classList.add("caret");
        parts.append(el);
      }
      if (caret === n) {
        const end = document.createElement("span");
        end.className = "caret caret-end";
        end.dataset.at = String(n);
        parts.append(end);
      }
      box.replaceChildren(parts);
      list.replaceChildren(...spans.map((s, i) => {
        const li = document.createElement("li");
        const tag = document.createElement("span");
        tag.className = "tagged l" + (labels.indexOf(s.label) + 1);
        tag.textContent = s.label;
        const quote = document.createElement("q");
        quote.textContent = excerpt(s);
        const where = document.createElement("span");
        where.className = "muted";
        where.textContent = `${s.start}-${s.end}`;
        const remove = document.createElement("button");
        remove.type = "button";
        remove.className = "link";
        remove.textContent = "remove";
        remove.addEventListener("click", () => { spans.splice(i, 1); render(); });
        li.append(tag, " ", quote, " ", where, " ", remove);
        return li;
      }));
      list.hidden = spans.length === 0;
      field.value = spans.map((s) => `${s.start}-${s.end} ${s.label}`).join("\n");
    }
    function load() {
      spans = [];
      for (const line of field.value.split("\n")) {
        const m = /^\s*(\d+)\s*-\s*(\d+)\s+(\S.*?)\s*$/.exec(line);
        if (m) spans.push({ start: Number(m[1]), end: Number(m[2]), label: m[3] });
      }
      spans.sort((a, b) => a.start - b.start);
      spans = spans.filter((s, i) => s.start < s.end && s.end <= n && labels.includes(s.label)
                                     && (i === 0 || spans[i - 1].end <= s.start));
      caret = 0;
      anchor = null;
      render();
    }

    function tag(label) {
      const sel = selection();
      if (!sel) { say("Select part of the response first: with the mouse, or Shift and the arrow keys."); return; }
      let [a, b] = sel;
      while (a < b && /\s/.test(chars[a])) a++;  // spaces and newlines at either end are left out
      while (b > a && /\s/.test(chars[b - 1])) b--;
      if (a === b) { say("Only spaces are selected: select some words."); return; }
      const before = spans.length;
      spans = spans.filter((s) => s.end <= a || s.start >= b);  // the new tag replaces what it overlaps
      spans.push({ start: a, end: b, label });
      spans.sort((x, y) => x.start - y.start);
      anchor = null;
      caret = b;
      unskip();
      refresh();
      render();
      const replaced = before + 1 - spans.length;
      if (replaced) say(`Replaced ${replaced} overlapping span${replaced > 1 ? "s" : ""}.`);
    }
    function removeAt(i) {
      let j = spans.findIndex((s) => s.start <= i && i < s.end);
      if (j < 0) j = spans.findIndex((s) => s.end === i);
      if (j < 0) { say("There is no span at the caret to remove."); return; }
      spans.splice(j, 1);
      render();
    }

    function wordEnd(i) { while (i < n && !WORD.test(chars[i])) i++; while (i < n && WORD.test(chars[i])) i++; return i; }
    function wordStart(i) { while (i > 0 && !WORD.test(chars[i - 1])) i--; while (i > 0 && WORD.test(chars[i - 1])) i--; return i; }
    function lineStart(i) { while (i > 0 && chars[i - 1] !== "\n") i--; return i; }
    function lineEnd(i) { while (i < n && chars[i] !== "\n") i++; return i; }
    function move(to, extend) {
      if (!extend) anchor = null;
      else if (anchor === null) anchor = caret;
      caret = Math.max(0, Math.min(n, to));
      render();
      const shown = box.querySelector(".caret");
      if (shown) shown.scrollIntoView({ block: "nearest", inline: "nearest" });
    }
    function key(e) {
      const k = e.key;
      const column = caret - lineStart(caret);
      if (k === "ArrowLeft") move(e.ctrlKey ? wordStart(caret) : caret - 1, e.shiftKey);
      else if (k === "ArrowRight") move(e.ctrlKey ? wordEnd(caret) : caret + 1, e.shiftKey);
      else if (k === "Home") move(lineStart(caret), e.shiftKey);
      else if (k === "End") move(lineEnd(caret), e.shiftKey);
      else if (k === "ArrowUp") {
        const start = lineStart(caret);
        move(start === 0 ? 0 : Math.min(lineStart(start - 1) + column, start - 1), e.shiftKey);
      } else if (k === "ArrowDown") {
        const end = lineEnd(caret);
        move(end === n ? n : Math.min(end + 1 + column, lineEnd(end + 1)), e.shiftKey);
      } else if (k === "Escape" && anchor !== null) { anchor = null; render(); }
      else if ((k === "Backspace" || k === "Delete") && !e.ctrlKey) removeAt(caret);
      else if (/^[1-9]$/.test(k) && !e.ctrlKey && Number(k) <= labels.length) tag(labels[Number(k) - 1]);
      else return false;
      return true;
    }

    // A boundary of the page's selection -> a code point index into the response. Inside a
    // text piece, the UTF-16 units before the point are counted as code points; a mark counts
    // as its one character (included when the selection reaches into it).
    function indexAt(node, offset, isEnd) {
      const whole = document.createRange();
      whole.selectNodeContents(box);
      const side = whole.comparePoint(node, offset);
      if (side !== 0) return side < 0 ? 0 : n;
      if (node === box) { const child = box.childNodes[offset]; return child ? Number(child.dataset.at) : n; }
      const el = (node.nodeType === Node.TEXT_NODE ? node.parentElement : node).closest("[data-at]");
      const at = Number(el.dataset.at);
      const size = node.nodeType === Node.TEXT_NODE ? node.length : node.childNodes.length;
      if (el.dataset.cp) return (isEnd ? offset > 0 : offset >= size) ? at + 1 : at;
      if (node.nodeType !== Node.TEXT_NODE) return offset > 0 ? at + Array.from(el.textContent).length : at;
      return at + Array.from(node.data.slice(0, offset)).length;
    }
    document.addEventListener("mouseup", () => {
      const picked = window.getSelection();
      if (!picked.rangeCount || !picked.getRangeAt(0).intersectsNode(box)) return;
      const r = picked.getRangeAt(0);
      const a = indexAt(r.startContainer, r.startOffset, false);
      const b = indexAt(r.endContainer, r.endOffset, true);
      anchor = a < b ? a : null;
      caret = a < b ? b : a;
      picked.removeAllRanges();
      render();
    });
    form.querySelectorAll(".tagbtn").forEach((b) => b.addEventListener("click", () => tag(b.dataset.label)));
    const copy = document.getElementById("copy-response");
    if (copy) copy.addEventListener("click", () => {
      const correction = document.getElementById("correction");
      correction.value = chars.join("");
      correction.focus();
    });
    document.querySelectorAll(".span-tools").forEach((el) => { el.hidden = false; });
    document.getElementById("span-lines").hidden = true;
    return { key, load };
  }
  const marker = kind === "spans" ? spanMarker() : null;
  if (marker) marker.load();

  // Show the current answer on the response cards themselves.
  function refresh() {
    if (hint) hint.textContent = "";
    const cards = Array.from(form.querySelectorAll(".response"));
    cards.forEach((c) => c.classList.remove("chosen", "rejected", "ranked"));
    if (kind === "pair") {
      const c = checked("choice");
      if (c === "A" || c === "B") {
        const win = c === "A" ? 0 : 1;
        cards[win].classList.add("chosen");
        cards[1 - win].classList.add("rejected");
      }
    } else if (kind === "ranking") {
      selects().forEach((s, i) => { if (s.value) cards[i].classList.add(s.value === "1" ? "chosen" : "ranked"); });
    } else if (kind === "thumbs") {
      const c = checked("label");
      if (c === "up") cards[0].classList.add("chosen");
      if (c === "down") cards[0].classList.add("rejected");
    }
  }

  function submit() {
    if (sent) return;
    if (!ready()) {
      say(kind === "ranking" ? "Give every response a different rank first."
        : kind === "spans" ? "Mark a span or write a correction first." : "Choose an answer first.");
      return;
    }
    sent = true;
    form.requestSubmit();
  }

  // Times are written in UTC; show them in the viewer's own time zone.
  document.querySelectorAll("time[datetime]").forEach((t) => {
    const d = new Date(t.dateTime);
    if (!isNaN(d)) { t.title = t.textContent; t.textContent = d.toLocaleString(); }
  });

  // Small images (agent clips) are scaled up: keep their pixels sharp rather than blurred.
  document.querySelectorAll("img.media").forEach((img) => {
    const mark = () => { if (img.naturalWidth && img.naturalWidth < img.clientWidth) img.classList.add("upscaled"); };
    if (img.complete) mark(); else img.addEventListener("load", mark);
  });

  // A page the browser shows again (Back, Forward) must never carry an earlier choice or
  // comment: one from its back-forward cache is fetched anew (the item may have changed),
  // and any form state the browser restored is reset to what the server rendered.
  window.addEventListener("pageshow", (e) => {
    if (e.persisted) { window.location.reload(); return; }
    if (!form) return;
    form.reset();
    sent = false;
    document.getElementById("submit").disabled = false;
    refresh();
    if (marker) marker.load();
  });

  if (form) {
    form.addEventListener("change", refresh);
    form.addEventListener("submit", (e) => {
      if (!ready()) { e.preventDefault(); sent = false; submit(); return; }
      sent = true;
      document.getElementById("submit").disabled = true;
    });
  }

  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.metaKey) return;
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio" && t.type !== "checkbox"));
    if (typing) {
      if (form && t.tagName === "TEXTAREA" && e.key === "Enter" && e.ctrlKey) { e.preventDefault(); submit(); }
      if (e.key === "Escape") t.blur();
      return;
    }
    if (marker && marker.key(e)) { e.preventDefault(); return; }
    if (e.ctrlKey) return;
    const key = e.key;
    if ((key === "u" || key === "U") && undo) { e.preventDefault(); undo.requestSubmit(); return; }
    const panel = document.getElementById("guidelines-panel");
    if (key === "g" && panel) { e.preventDefault(); panel.open = !panel.open; return; }
    if (key === "Escape" && panel && panel.open) { panel.open = false; return; }
    if (!form) return;
    let handled = true;
    if (key === "Enter") submit();
    else if (key === "c") { const d = form.querySelector("details.comment"); d.open = true; document.getElementById("comment").focus(); }
    else if (key === "e" && kind === "spans") { form.querySelector("details.correction").open = true; document.getElementById("correction").focus(); }
    else if (key === "0" || key === "ArrowDown") check("choice", "skip");
    else if (kind === "pair") {
      if (key === "1" || key === "ArrowLeft") check("choice", "A");
      else if (key === "2" || key === "ArrowRight") check("choice", "B");
      else if (key === "3" || key === "ArrowUp") check("choice", "tie");
      else if (key === "4") check("choice", "both_bad");
      else handled = false;
    } else if (kind === "thumbs") {
      if (key === "1" || key === "ArrowLeft") check("label", "up");
      else if (key === "2" || key === "ArrowRight") check("label", "down");
      else handled = false;
    } else if (kind === "rating") {
      const now = Number(checked("score") || 4);
      if (/^[1-7]$/.test(key)) check("score", key);
      else if (key === "ArrowLeft") check("score", String(checked("score") ? Math.max(1, now - 1) : now));
      else if (key === "ArrowRight") check("score", String(checked("score") ? Math.min(7, now + 1) : now));
      else handled = false;
    } else if (kind === "ranking") {
      if (/^[1-9]$/.test(key)) rankNext(Number(key) - 1);
      else if (key === "Backspace") rankBack();
      else handled = false;
    } else handled = false;
    if (handled) e.preventDefault();
  });
})();
