// heed labelling page: keyboard shortcuts over a form that also works without this script.
// 1/← and 2/→ choose, 3/↑ tie, 4 both bad, 0/↓ skip, Enter submits, u undoes, c comments,
// g opens and closes the guidelines.
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
  function ready() {
    if (skipping()) return true;
    if (kind === "pair") return checked("choice") !== null;
    if (kind === "thumbs") return checked("label") !== null;
    if (kind === "rating") return checked("score") !== null;
    return rankingComplete();
  }

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
      if (hint) hint.textContent = kind === "ranking" ? "Give every response a different rank first." : "Choose an answer first.";
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
