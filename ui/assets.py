"""The page's CSS and the small scripts it runs (keyboard shortcuts, focus after a vote, live regions).

Phone first: the two images sit side by side at every width, sized so that they and the four outcome buttons fit a
390x844 phone and a 1366x768 laptop screen without scrolling; key hints show only where a fine pointer (a mouse, so
most likely a keyboard) is present, touch screens see plain labels.
"""

from __future__ import annotations

import json

OUTCOMES = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both are bad"}
KEYS = {"left": ("1", "a"), "right": ("2", "l"), "tie": ("3", "t"), "both_bad": ("4", "b")}

CSS = """
.gradio-container { padding-top: 4px !important; }
#app-title h1 { font-size: 1.25rem; margin: 0; }
#app-title p { margin: 0; font-size: 0.9rem; }
#how-to, #my-counter { font-size: 0.85rem; margin: 0; line-height: 1.3; }
#my-counter { opacity: 0.8; min-height: 1.3em; }
#how-to p, #my-counter p { margin: 0; }
.touch-only { display: none; }
@media (hover: none), (pointer: coarse) {
  .kbd-only { display: none !important; }
  .touch-only { display: inline; }
}
#arena-pair .arena-prompt { margin: 0 0 4px 0; font-weight: 600; overflow-wrap: anywhere; }
#arena-pair .pair-imgs { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; justify-items: center; }
#arena-pair figure { margin: 0; width: 100%; max-width: min(100%, calc(100svh - 460px)); min-width: 0; }
#arena-pair img { display: block; width: 100%; aspect-ratio: 1 / 1; height: auto; border-radius: 6px;
  image-rendering: pixelated; image-rendering: crisp-edges; background: #8882; }
#arena-pair.pair-loading img { visibility: hidden; }
#arena-pair figcaption { text-align: center; font-size: 0.85rem; }
#arena-pair .pair-empty { min-height: 120px; display: flex; align-items: center; justify-content: center; }
#vote-row { display: grid !important; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 8px; }
#vote-row > * { min-width: 0 !important; }
#vote-row button { min-height: 44px; white-space: normal; }
@media (max-width: 700px) { #vote-row { grid-template-columns: 1fr 1fr; } }
@media (hover: hover) and (pointer: fine) {
  #vote-left::after { content: "1"; } #vote-right::after { content: "2"; }
  #vote-tie::after { content: "3"; } #vote-both_bad::after { content: "4"; }
  #vote-row button::after { margin-left: 0.5em; padding: 0 0.35em; border: 1px solid currentColor;
    border-radius: 3px; font-size: 0.75em; opacity: 0.7; }
}
#arena-reveal { min-height: 1.5em; }
#arena-reveal p, #arena-status p { margin: 0.2em 0; }
.visually-hidden { position: absolute !important; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
#quality-chart svg { width: 100%; height: auto; max-height: 360px; }
#before-after .ba-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
#before-after figure { margin: 0; }
#before-after .ba-imgs { display: grid; grid-template-columns: 1fr 1fr; gap: 4px; }
#before-after img { width: 100%; aspect-ratio: 1 / 1; image-rendering: pixelated; border-radius: 4px; }
#before-after figcaption, #before-after .ba-labels { font-size: 0.8rem; overflow-wrap: anywhere; }
#before-after .ba-labels { display: grid; grid-template-columns: 1fr 1fr; text-align: center; }
"""

# Runs once on load: keyboard shortcuts (click the outcome's button unless the user is typing; disabled buttons
# ignore it), aria-keyshortcuts on the buttons, and the live regions (the reveal and the counter are announced).
# A new pair swaps the images' src in place, and the browser keeps painting the old picture until the new one has
# loaded: for that moment the new prompt stood over the last pair's images, and a vote cast then was stored against
# images the rater never saw. So the pair is hidden while any of its images loads, and votes wait for it.
PAGE_JS = """() => {
  if (window.__ncpArena) return; window.__ncpArena = true;
  const keys = __KEYS__;
  const pairReady = () => [...document.querySelectorAll('#arena-pair img')].every(i => i.complete);
  const sync = () => {
    const p = document.getElementById('arena-pair'); if (p) p.classList.toggle('pair-loading', !pairReady());
  };
  document.addEventListener('load', sync, true); document.addEventListener('error', sync, true);
  new MutationObserver(sync).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                      attributeFilter: ['src']});
  document.addEventListener('click', (e) => {
    if (e.target && e.target.closest && e.target.closest('#vote-row') && !pairReady()) {
      e.preventDefault(); e.stopImmediatePropagation();
    }
  }, true);
  document.addEventListener('keydown', (e) => {
    const el = e.target, tag = ((el && el.tagName) || '').toLowerCase();
    const typing = tag === 'textarea' || tag === 'select' || (el && el.isContentEditable) ||
      (tag === 'input' && !['checkbox', 'radio', 'button', 'range'].includes((el.type || '').toLowerCase()));
    if (typing || e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const id = keys[e.key.toLowerCase()];
    const btn = id && document.getElementById(id);
    if (!btn || btn.disabled || btn.offsetParent === null || !pairReady()) return;
    e.preventDefault(); btn.click();
  });
  const mark = () => {
    for (const [o, ks] of Object.entries(__HINTS__)) {
      const b = document.getElementById('vote-' + o); if (b) b.setAttribute('aria-keyshortcuts', ks);
    }
    for (const id of ['arena-reveal', 'my-counter']) {
      const r = document.getElementById(id); if (r) { r.setAttribute('aria-live', 'polite'); r.setAttribute('role', 'status'); }
    }
  };
  mark(); setTimeout(mark, 1000);
}""".replace("__KEYS__", json.dumps({k: f"vote-{o}" for o, ks in KEYS.items() for k in ks})).replace(
    "__HINTS__", json.dumps({o: " ".join(ks) for o, ks in KEYS.items()})
)


def after_vote_js(outcome: str) -> str:
    """Runs when the next pair is in: scroll the arena into place and give focus back to the button just used."""
    return """() => {
  const until = Date.now() + 5000;
  const go = () => {
    const btn = document.getElementById('vote-__O__');
    if (btn && !btn.disabled) {
      const top = document.getElementById('arena-pair');
      if (top) top.scrollIntoView({block: 'nearest'});
      btn.focus({preventScroll: true});
    } else if (Date.now() < until) { setTimeout(go, 50); }
  };
  go();
}""".replace("__O__", outcome)
