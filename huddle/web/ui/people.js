// People: the People button and panel listing everyone in the call with their states (microphone, camera,
// raised hand, reconnecting, connection quality), the Raise hand button, and the hand and quality marks on
// the tiles (added to the tiles that tiles.js makes, found through its `tiles` map).

import { $ } from './dom.js';
import { onTileChange, tiles } from './tiles.js';

const ui = {
  button: $('#toggle-people'),
  count: $('#toggle-people .people-count'),
  panel: $('#people-panel'),
  close: $('#people-panel .side-panel-close'),
  list: $('#people-list'),
  hand: $('#toggle-hand'),
  handLabel: $('#toggle-hand .control-label'),
  announcer: $('#people-announcer'),
};

const QUALITY_WORDS = { good: 'Connection: good', fair: 'Connection: fair', poor: 'Connection: poor' };
const SVG = 'http://www.w3.org/2000/svg';
const ICONS = {
  micOff: 'M3.3 2.3a1 1 0 0 0-1.4 1.4l16.8 16.8a1 1 0 0 0 1.4-1.4l-3.3-3.3A7 7 0 0 0 19 11a1 1 0 1 0-2 0 5 5 0 0 1-.9 2.9l-1.4-1.4A3 3 0 0 0 15 11V5a3 3 0 0 0-5.9-.8zM9 10.8V11a3 3 0 0 0 3 3h.2zM7 11a1 1 0 1 0-2 0 7 7 0 0 0 6 6.9V20H9a1 1 0 1 0 0 2h6a1 1 0 1 0 0-2h-2v-2.1a7 7 0 0 0 1.7-.5l-1.6-1.5A5 5 0 0 1 7 11z',
  micOn: 'M12 14a3 3 0 0 0 3-3V5a3 3 0 0 0-6 0v6a3 3 0 0 0 3 3zm5-3a1 1 0 1 1 2 0 7 7 0 0 1-6 6.9V20h2a1 1 0 1 1 0 2H9a1 1 0 1 1 0-2h2v-2.1A7 7 0 0 1 5 11a1 1 0 1 1 2 0 5 5 0 0 0 10 0z',
  camOff: 'M2.3 2.3a1 1 0 0 1 1.4 0l18 18a1 1 0 0 1-1.4 1.4l-2.5-2.5A3 3 0 0 1 13 20H6a3 3 0 0 1-3-3V7a3 3 0 0 1 .6-1.8l-1.3-1.5a1 1 0 0 1 0-1.4zM16 8.6l3.4-2.3A1 1 0 0 1 21 7.1v9.8a1 1 0 0 1-1 1L8.1 4H13a3 3 0 0 1 3 3z',
  camOn: 'M3 7a3 3 0 0 1 3-3h7a3 3 0 0 1 3 3v1.6l3.4-2.3A1 1 0 0 1 21 7.1v9.8a1 1 0 0 1-1.6.8L16 15.4V17a3 3 0 0 1-3 3H6a3 3 0 0 1-3-3z',
  hand: 'M9 3a1.5 1.5 0 0 1 3 0v7h.5V4.5a1.5 1.5 0 0 1 3 0V11h.5V6.5a1.5 1.5 0 0 1 3 0V15a7 7 0 0 1-7 7h-.6a7 7 0 0 1-5.6-2.8l-3.1-4.2a1.5 1.5 0 0 1 2.3-1.9L7 15V5.5a1.5 1.5 0 0 1 2-1.4z',
  signal: 'M3 18h3v3H3zm5-4h3v7H8zm5-4h3v11h-3zm5-5h3v16h-3z',
  reconnecting: 'M12 4a8 8 0 0 1 7.4 5H17a1 1 0 1 0 0 2h4a1 1 0 0 0 1-1V6a1 1 0 1 0-2 0v1.3A10 10 0 0 0 2.1 10.8a1 1 0 1 0 2 .3A8 8 0 0 1 12 4zm9.1 9.2a1 1 0 0 0-1.2.8A8 8 0 0 1 4.6 15H7a1 1 0 1 0 0-2H3a1 1 0 0 0-1 1v4a1 1 0 1 0 2 0v-1.3a10 10 0 0 0 17.9-3.5 1 1 0 0 0-.8-1z',
};

let huddle = null; // the HuddleClient (initPeople)
let monitor = null; // the ConnectionMonitor (lib/stats.js)

/** An icon with an accessible name (role img), or, with no `label`, nothing. */
function mark(className, icon, label) {
  const span = document.createElement('span');
  span.className = `state-mark ${className}`;
  span.setAttribute('role', 'img');
  span.setAttribute('aria-label', label);
  span.title = label;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS(SVG, 'path');
  path.setAttribute('d', ICONS[icon]);
  svg.append(path);
  span.append(svg);
  return span;
}

function qualityMark(quality) {
  const span = mark('quality-mark', 'signal', QUALITY_WORDS[quality]);
  span.dataset.quality = quality;
  return span;
}

/** What we know of someone: ours from the client's own state, others' from the server's. */
function stateOf(id) {
  if (id === 'local') {
    return {
      name: huddle.self?.name || tiles.get('local')?.dataset.name || 'You', self: true,
      audio: huddle.audioEnabled, video: huddle.videoEnabled, hand: huddle.handRaised,
      reconnecting: huddle.state === 'reconnecting', quality: monitor.self,
    };
  }
  const p = huddle.participants.get(id);
  if (!p) return null;
  return {
    name: p.name || 'Guest', self: false, audio: p.audio !== false, video: p.video !== false, hand: p.hand === true,
    reconnecting: p.connection === 'reconnecting', quality: monitor.participants.get(id) || null,
  };
}

/** The hand and quality marks in `tile`'s label, as `state` says. */
function markTile(tile, state) {
  const label = $('.tile-label', tile);
  if (!label) return;
  let marks = $('.people-marks', label);
  if (!marks) {
    marks = document.createElement('span');
    marks.className = 'people-marks';
    label.prepend(marks);
  }
  const wanted = [];
  if (state?.hand) wanted.push(mark('hand-mark', 'hand', 'Hand raised'));
  if (state?.quality) wanted.push(qualityMark(state.quality));
  // Rebuilt only when it changes: screen readers and hover titles must not flicker every sweep.
  const key = wanted.map((m) => m.getAttribute('aria-label')).join('|');
  if (marks.dataset.key === key) return;
  marks.dataset.key = key;
  marks.replaceChildren(...wanted);
  tile.dataset.hand = state?.hand ? 'raised' : 'down';
}

function listItem(id, state) {
  const item = document.createElement('li');
  item.className = 'person';
  item.dataset.id = id;
  if (state.hand) item.classList.add('hand-raised');
  const name = document.createElement('span');
  name.className = 'person-name';
  name.textContent = state.self ? `${state.name} (you)` : state.name;
  const marks = document.createElement('span');
  marks.className = 'person-marks';
  if (state.hand) marks.append(mark('hand-mark', 'hand', 'Hand raised'));
  if (state.reconnecting) marks.append(mark('reconnecting-mark', 'reconnecting', 'Reconnecting'));
  if (state.quality) marks.append(qualityMark(state.quality));
  marks.append(state.audio ? mark('mic-mark', 'micOn', 'Microphone on') : mark('mic-mark off', 'micOff', 'Muted'));
  marks.append(state.video ? mark('cam-mark', 'camOn', 'Camera on') : mark('cam-mark off', 'camOff', 'Camera off'));
  item.append(name, marks);
  return item;
}

/** The list, the tiles' marks, the count on the People button and the hand button, as they are now. */
export function updatePeople() {
  if (!huddle) return;
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  const ids = inCall ? ['local', ...huddle.participants.keys()] : [];
  const items = [];
  const raised = [];
  for (const id of ids) {
    const state = stateOf(id);
    if (!state) continue;
    items.push([state.hand ? 0 : 1, items.length, listItem(id, state)]);
    if (state.hand) raised.push(state);
  }
  // Raised hands first (in join order), then everyone else in join order, ourselves first.
  items.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  ui.list.replaceChildren(...items.map(([, , item]) => item));
  ui.count.textContent = inCall ? String(ids.length) : '';
  const hands = raised.length ? `, ${raised.length} ${raised.length === 1 ? 'hand' : 'hands'} raised` : '';
  ui.button.setAttribute('aria-label', inCall ? `People, ${ids.length}${hands}` : 'People');

  for (const [id, tile] of tiles) markTile(tile, inCall ? stateOf(id) : null);

  const up = huddle.handRaised;
  // The label says what a press does (no aria-pressed, which would contradict it); the colour says it is up.
  ui.hand.dataset.raised = String(up);
  ui.handLabel.textContent = up ? 'Lower hand' : 'Raise hand';
  ui.hand.title = up ? 'Lower your hand' : 'Raise your hand';
  ui.hand.disabled = huddle.state !== 'connected';
}

/**
 * Fits an open side panel (`panel`, chat or people) between the header and the controls, whose heights change
 * with the window's width (either may take two rows on a phone) and with the network banner.
 */
export function placeSidePanel(panel) {
  if (panel.hidden) return;
  const top = $('.topbar').getBoundingClientRect().bottom;
  const bottom = $('footer.controls').getBoundingClientRect().top;
  panel.style.top = `${Math.round(top + 8)}px`;
  panel.style.bottom = `${Math.max(0, Math.round(window.innerHeight - bottom + 8))}px`;
}

const sidePanels = new ResizeObserver(() => {
  for (const panel of document.querySelectorAll('.side-panel')) placeSidePanel(panel);
});
sidePanels.observe($('.topbar'));
sidePanels.observe($('footer.controls'));
window.addEventListener('resize', () => {
  for (const panel of document.querySelectorAll('.side-panel')) placeSidePanel(panel);
});

export function openPeople(open = ui.panel.hidden) {
  ui.panel.hidden = !open;
  placeSidePanel(ui.panel);
  ui.button.setAttribute('aria-expanded', String(open));
  document.body.classList.toggle('people-open', open);
  if (open) {
    ui.close.focus();
    document.dispatchEvent(new CustomEvent('huddle:side-panel', { detail: { panel: ui.panel } }));
  } else if (document.activeElement && ui.panel.contains(document.activeElement)) {
    ui.button.focus();
  }
}

/** Says, for screen readers, that someone else raised their hand (the list and tile show it to the eye). */
function announceHand(event) {
  const { participant, isSelf } = event.detail;
  if (isSelf) return;
  const was = announceHand.raised.has(participant.id);
  if (participant.hand === true && !was) {
    announceHand.raised.add(participant.id);
    ui.announcer.textContent = `${participant.name || 'Someone'} raised their hand`;
  } else if (participant.hand !== true && was) {
    announceHand.raised.delete(participant.id);
  }
}
announceHand.raised = new Set();

/** People, hands and connection quality of `client` (a HuddleClient), graded by `connectionMonitor`. */
export function initPeople(client, connectionMonitor) {
  huddle = client;
  monitor = connectionMonitor;
  for (const type of ['state', 'joined', 'resumed', 'participant-joined', 'participant-left', 'participant-updated',
    'local-media']) {
    huddle.addEventListener(type, updatePeople);
  }
  huddle.addEventListener('participant-updated', announceHand);
  huddle.addEventListener('participant-left', (event) => announceHand.raised.delete(event.detail.participantId));
  monitor.addEventListener('update', updatePeople);
  onTileChange((change, id, tile) => {
    if (change === 'added') markTile(tile, stateOf(id));
  });
  ui.hand.addEventListener('click', () => huddle.setHandRaised(!huddle.handRaised));
  ui.button.addEventListener('click', () => openPeople());
  ui.close.addEventListener('click', () => openPeople(false));
  ui.panel.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') openPeople(false);
  });
  document.addEventListener('huddle:side-panel', (event) => {
    if (event.detail.panel !== ui.panel && !ui.panel.hidden) openPeople(false);
  });
  updatePeople();
}
