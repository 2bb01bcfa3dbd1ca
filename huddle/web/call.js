// The call page: turns HuddleClient events into tiles, buttons and messages. All signaling and WebRTC work is
// in client.js; this file only touches the DOM.

import { HuddleClient, ROOM_PATTERN, cleanDisplayName } from './client.js';

const NAME_KEY = 'huddle.name';
// "Always relay calls": '1' when on (HuddleClient relayOnly). Remembered in this browser, like the name.
const RELAY_KEY = 'huddle.alwaysRelay';

const STATUS_WORDS = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  connected: 'Connected',
  reconnecting: 'Reconnecting…',
  disconnected: 'Connection lost',
  error: 'Not connected',
};

const PEER_WORDS = {
  new: 'Connecting…',
  connecting: 'Connecting…',
  disconnected: 'Reconnecting…',
  failed: 'Could not connect',
};

const ERROR_WORDS = {
  unauthorized: 'This invite link is not valid. Ask whoever invited you for a new link.',
  token_expired: 'This invite link has expired. Ask whoever invited you for a new link.',
  wrong_room: 'This invite link is for a different room. Open the link you were sent for this call.',
  invalid_room: 'This room name is not allowed. Room names are 1–64 letters, digits, “-” or “_”.',
  invalid_name: 'Please enter a name of 1–64 characters.',
  room_full: 'This call is full. Try again later.',
  already_joined: 'You are already in this call.',
  connection_failed: 'Could not reach the Huddle server. Check your connection and try again.',
  connection_lost: 'The connection to the server was lost.',
  replaced: 'You joined this call from another tab or device, so this one was disconnected.',
  unsupported_mode: 'This call uses a mode this page does not support yet. Try reloading the page.',
  resume_failed: 'The connection to the call was lost for too long to pick it up again. Rejoin to continue.',
  removed: 'The server ended your connection to the call. Rejoin to continue.',
  bad_sdp: 'The server could not use this browser’s audio or video. Try reloading the page.',
  relay_unavailable: '“Always relay calls” is on, but this server has no relay, so the call cannot connect. '
    + 'Turn it off in Settings and rejoin to connect directly.',
};

// Errors that need no words for people: retried, or only interesting to developers.
// unknown_type: a server older than this page (e.g. one that does not know `video_sizes`) works without it.
const QUIET_ERRORS = new Set(['rate_limited', 'unknown_participant', 'aborted', 'wrong_mode', 'timeout',
  'unknown_type']);

// Why a start_recording / stop_recording was refused (other codes: the server's own words).
const RECORDING_ERROR_WORDS = {
  forbidden: 'Your invite link does not allow recording this call.',
  already_recording: 'This call is being recorded already.',
  unavailable: 'This server cannot record calls right now.',
  unknown_type: 'This server cannot record calls.', // one older than this page
};

// Said for a moment in the status pill after a resume that found the call gone from the server's memory
// (`resumed` with `restored`): the server restarted, or another one took the call over (`moved`).
const RESTORED_WORDS = 'The server restarted; you are back in the call';
const MOVED_WORDS = 'The call moved to another server; you are back in it';
const STATUS_NOTICE_MS = 6000;

// Notes on a tile about the other person's own connection to the server (participant.connection).
const PARTICIPANT_CONNECTION_WORDS = {
  reconnecting: 'Reconnecting…',
};

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  grid: $('#grid'),
  status: $('#status'),
  count: $('#participant-count'),
  error: $('#error'),
  errorText: $('#error .error-text'),
  joinPanel: $('#join-panel'),
  joinForm: $('#join-form'),
  nameInput: $('#name-input'),
  nameError: $('#name-error'),
  leftPanel: $('#left-panel'),
  leftTitle: $('#left-title'),
  leftNote: $('#left-note'),
  rejoin: $('#rejoin'),
  audioButton: $('#toggle-audio'),
  videoButton: $('#toggle-video'),
  leaveButton: $('#leave'),
  copyLink: $('#copy-link'),
  soundBlocked: $('#sound-blocked'),
  tileTemplate: $('#tile-template'),
  strip: $('#strip'),
  pager: $('#pager'),
  pagePrev: $('#page-prev'),
  pageNext: $('#page-next'),
  pageLabel: $('#page-label'),
  layoutSpeaker: $('#layout-speaker'),
  layoutGallery: $('#layout-gallery'),
  recordButton: $('#toggle-recording'),
  recordingIndicator: $('#recording-indicator'),
  recordingElapsed: $('#recording-indicator .recording-elapsed'),
  recordingAnnouncer: $('#recording-announcer'),
  recordingsLink: $('#recordings-link'),
  settingsButton: $('#settings-button'),
  settingsPanel: $('#settings-panel'),
  alwaysRelay: $('#always-relay'),
  alwaysRelayLater: $('#always-relay-later'),
};

// --- what this page was opened with ---

function roomFromPath() {
  const match = location.pathname.match(/^\/r\/([^/]+)\/?$/);
  if (!match) return '';
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1];
  }
}

const params = new URLSearchParams(location.search);
const room = roomFromPath();
const token = params.get('token') || undefined;
let displayName = params.get('name') || undefined;

function storedRelayChoice() {
  try {
    return localStorage.getItem(RELAY_KEY) === '1';
  } catch {
    return false; // storage blocked: the setting starts off
  }
}

const huddle = new HuddleClient({ relayOnly: storedRelayChoice() });
window.huddle = huddle;

// --- tiles ---

const tiles = new Map(); // participant id (or 'local') -> tile element

function initial(name) {
  const letter = (name || '?').trim().charAt(0);
  return letter ? letter.toUpperCase() : '?';
}

function createTile({ local, participantId, name }) {
  const tile = ui.tileTemplate.content.firstElementChild.cloneNode(true);
  tile.classList.add(local ? 'local' : 'remote');
  const video = $('video', tile);
  if (local) {
    video.muted = true; // never play our own microphone back
    tile.dataset.connection = 'local';
    $('.pin', tile).remove(); // we pin others, not ourselves
  } else {
    tile.dataset.participantId = participantId;
    watchVideoSize(video);
  }
  setTileName(tile, name, local);
  ui.grid.insertBefore(tile, ui.strip);
  tiles.set(local ? 'local' : participantId, tile);
  layout();
  return tile;
}

function setTileName(tile, name, local) {
  const shown = name || 'Guest';
  tile.dataset.name = shown;
  $('.name', tile).textContent = local ? `${shown} (you)` : shown;
  $('.avatar', tile).textContent = initial(shown);
  const pin = $('.pin', tile);
  if (pin) updatePinButton(tile);
}

function setTileMedia(tile, { audio, video }) {
  if (audio !== undefined) {
    $('.muted-indicator', tile).hidden = audio;
    tile.dataset.audio = audio ? 'on' : 'off';
  }
  if (video !== undefined) {
    $('.camera-off', tile).hidden = video;
    tile.dataset.video = video ? 'on' : 'off';
  }
}

// Two sources for the note on a tile: the media connection it is shown through (data-connection, from
// peer-state) and the person's own connection to the server (data-connection-state: connected | reconnecting,
// from participant.connection). Someone who is reconnecting keeps their tile, with a note saying so.
function setTileConnection(tile, state) {
  tile.dataset.connection = state;
  updateConnectionNote(tile);
}

function setTileParticipantConnection(tile, connection) {
  tile.dataset.connectionState = connection || 'connected';
  updateConnectionNote(tile);
}

function updateConnectionNote(tile) {
  const note = $('.connection-note', tile);
  const words = PARTICIPANT_CONNECTION_WORDS[tile.dataset.connectionState] || PEER_WORDS[tile.dataset.connection];
  note.hidden = !words;
  note.textContent = words || '';
}

function playVideo(video) {
  const played = video.play();
  if (!played) return;
  played.catch((err) => {
    if (err.name !== 'NotAllowedError') return;
    // Autoplay with sound was refused: play muted now, offer a button for the sound.
    video.muted = true;
    video.dataset.soundBlocked = 'true';
    video.play().catch(() => {});
    ui.soundBlocked.hidden = false;
  });
}

function ensureRemoteTile(participant) {
  let tile = tiles.get(participant.id);
  if (!tile) tile = createTile({ local: false, participantId: participant.id, name: participant.name });
  setTileName(tile, participant.name, false);
  setTileMedia(tile, { audio: participant.audio !== false, video: participant.video !== false });
  setTileParticipantConnection(tile, participant.connection);
  return tile;
}

function removeRemoteTile(participantId) {
  const tile = tiles.get(participantId);
  if (!tile) return;
  const video = $('video', tile);
  unwatchVideoSize(video);
  video.srcObject = null;
  tile.remove();
  tiles.delete(participantId);
  if (view.pinned === participantId) view.pinned = null;
  if (view.lastSpeaker === participantId) view.lastSpeaker = null;
  layout();
}

function clearRemoteTiles() {
  for (const id of [...tiles.keys()]) if (id !== 'local') removeRemoteTile(id);
}

function localTile() {
  return tiles.get('local') || createTile({ local: true, name: displayName });
}

function showLocalStream(stream) {
  const tile = localTile();
  const video = $('video', tile);
  if (video.srcObject !== stream) video.srcObject = stream;
  if (stream) playVideo(video);
  updateLocalState();
}

// --- layouts ---
//
// Gallery: everyone the same size, the largest tiles that fit the stage, GALLERY_PAGE_SIZE to a page (page
//   buttons when there are more); with two people, Meet-style: the other person fills the stage and we are a
//   picture-in-picture in its corner.
// Speaker: one large tile (.stage: the pinned participant, else whoever speaks or spoke last) beside a strip
//   of small thumbnails of everyone else, which scrolls when they do not all fit.
// Until the user picks one (#layout-speaker, #layout-gallery), calls of three or more are in speaker view.
// Tiles always stay in join order (ours first); the layout only moves them between #grid and #strip.

const GALLERY_PAGE_SIZE = 25;
const THUMB_ASPECT = 16 / 9;

const view = {
  choice: null, // 'speaker' | 'gallery' once the user picked one; null: by the number of people
  pinned: null, // participant id
  page: 0, // gallery page
  lastSpeaker: null, // the last remote participant who was the active speaker
};

function remoteIds() {
  return [...tiles.keys()].filter((id) => id !== 'local');
}

function currentLayout() {
  return view.choice || (remoteIds().length >= 2 ? 'speaker' : 'gallery');
}

/** Who is large in speaker view: pinned, else speaking (not us), else spoke last, else the first. */
function stageId() {
  if (view.pinned && tiles.has(view.pinned)) return view.pinned;
  const speaker = huddle.activeSpeaker;
  if (speaker && speaker !== huddle.self?.id && tiles.has(speaker)) return speaker;
  if (view.lastSpeaker && tiles.has(view.lastSpeaker)) return view.lastSpeaker;
  return remoteIds()[0] || (tiles.has('local') ? 'local' : null);
}

/** The tile that fills a cellW x cellH cell best, its shape kept between 3:4 and 16:9 (videos are cropped). */
function fitTile(cellW, cellH) {
  const aspect = Math.min(16 / 9, Math.max(3 / 4, cellW / cellH));
  const w = Math.max(0, Math.min(cellW, cellH * aspect));
  return { w, h: w / aspect };
}

function contentBox(element) {
  const style = getComputedStyle(element);
  const px = (value) => parseFloat(value) || 0;
  return {
    width: element.clientWidth - px(style.paddingLeft) - px(style.paddingRight),
    height: element.clientHeight - px(style.paddingTop) - px(style.paddingBottom),
    gap: px(style.columnGap) || 8,
    padRight: px(style.paddingRight),
    padBottom: px(style.paddingBottom),
  };
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

/** Moves an element without restarting its video where the browser can (Element.moveBefore). */
function moveTo(parent, node, before) {
  if (typeof parent.moveBefore === 'function' && node.isConnected && parent.isConnected) {
    try {
      parent.moveBefore(node, before);
      return;
    } catch {
      // fall back to a plain insert
    }
  }
  parent.insertBefore(node, before);
}

/** Makes `nodes` children of `parent`, in this order, right before `anchor` (null: at the end). */
function arrange(parent, nodes, anchor) {
  let next = anchor;
  for (let i = nodes.length - 1; i >= 0; i -= 1) {
    const node = nodes[i];
    if (node.parentNode !== parent || node.nextElementSibling !== next) moveTo(parent, node, next);
    next = node;
  }
}

function setPx(name, value) {
  ui.grid.style.setProperty(name, `${Math.max(0, Math.floor(value))}px`);
}

function layout() {
  const mode = currentLayout();
  const order = [...tiles.values()];
  ui.grid.dataset.layout = mode;
  ui.grid.dataset.count = String(order.length);
  ui.layoutSpeaker.setAttribute('aria-pressed', String(mode === 'speaker'));
  ui.layoutGallery.setAttribute('aria-pressed', String(mode === 'gallery'));
  if (mode === 'speaker') layoutSpeaker(order);
  else layoutGallery(order);
  updateTileMarks();
  queueVideoSizes();
}

function layoutGallery(order) {
  ui.grid.classList.remove('speaker', 'strip-side', 'strip-bottom', 'no-strip');
  arrange(ui.grid, order, ui.strip);
  ui.strip.hidden = true;
  const shown = order.filter((tile) => !tile.hidden);
  const remotes = shown.filter((tile) => tile.classList.contains('remote'));
  const local = tiles.get('local');
  const pip = remotes.length === 1 && shown.length === 2 && local && !local.hidden;
  const pages = pip ? 1 : Math.max(1, Math.ceil(shown.length / GALLERY_PAGE_SIZE));
  view.page = clamp(view.page, 0, pages - 1);
  const onPage = new Set(pip ? shown
    : shown.slice(view.page * GALLERY_PAGE_SIZE, (view.page + 1) * GALLERY_PAGE_SIZE));
  for (const tile of order) {
    tile.classList.remove('stage');
    tile.classList.toggle('off-page', !tile.hidden && !onPage.has(tile));
  }
  ui.grid.classList.toggle('pip', Boolean(pip));
  ui.grid.classList.toggle('paged', pages > 1);
  ui.pager.hidden = pages <= 1;
  ui.pageLabel.textContent = `${view.page + 1} / ${pages}`;
  ui.pagePrev.disabled = view.page === 0;
  ui.pageNext.disabled = view.page >= pages - 1;

  const inGrid = pip ? remotes : [...onPage];
  const count = Math.max(1, inGrid.length);
  const { width, height, gap, padRight, padBottom } = contentBox(ui.grid);
  if (width <= 0 || height <= 0) return;
  // Try every column count; the arrangement with the largest tiles wins, counting only the part of a 16:9
  // picture a tile shows (a tall tile crops the sides away), so that close calls go to wider tiles.
  let best = { w: 0, h: 0 };
  let bestScore = 0;
  for (let cols = 1; cols <= count; cols += 1) {
    const rows = Math.ceil(count / cols);
    const tile = fitTile((width - gap * (cols - 1)) / cols, (height - gap * (rows - 1)) / rows);
    const shown = Math.min(1, (tile.w / tile.h) / (16 / 9));
    const score = tile.w * tile.h * Math.sqrt(shown);
    if (score > bestScore) {
      best = tile;
      bestScore = score;
    }
  }
  setPx('--tile-w', best.w);
  setPx('--tile-h', best.h);
  // The picture-in-picture sits inside the corner of the big tile, not beyond it.
  setPx('--pip-right', (width - best.w) / 2 + padRight + 14);
  setPx('--pip-bottom', (height - best.h) / 2 + padBottom + 14);
}

function layoutSpeaker(order) {
  ui.grid.classList.remove('pip', 'paged');
  ui.pager.hidden = true;
  const id = stageId();
  const stage = id ? tiles.get(id) : null;
  const others = order.filter((tile) => tile !== stage);
  for (const tile of order) {
    tile.classList.toggle('stage', tile === stage);
    tile.classList.remove('off-page');
  }
  arrange(ui.grid, stage ? [stage] : [], ui.strip);
  arrange(ui.strip, others, null);
  const withStrip = others.some((tile) => !tile.hidden);
  ui.strip.hidden = !withStrip;

  ui.grid.classList.add('speaker');
  const box = contentBox(ui.grid);
  // Wide stages put the thumbnails in a column on the right; narrow (portrait) ones in a row below.
  const side = box.width >= box.height * 1.25;
  ui.grid.classList.toggle('strip-side', withStrip && side);
  ui.grid.classList.toggle('strip-bottom', withStrip && !side);
  ui.grid.classList.toggle('no-strip', !withStrip);
  if (box.width <= 0 || box.height <= 0) return;
  // Thumbnails: small (200-320 px wide beside the stage), and as small as needed within that for all of them
  // to fit without scrolling; a row below a narrow stage takes smaller ones.
  const count = Math.max(1, others.filter((tile) => !tile.hidden).length);
  const stripGap = parseFloat(getComputedStyle(ui.strip).rowGap) || 8;
  const fitting = side ? ((box.height - stripGap * (count - 1)) / count) * THUMB_ASPECT
    : (box.width - stripGap * (count - 1)) / count;
  const thumbW = side ? clamp(Math.min(box.width * 0.2, fitting), 200, 320)
    : clamp(Math.min(box.width * 0.3, fitting), 112, 240);
  const thumbH = thumbW / THUMB_ASPECT;
  let stageW = box.width;
  let stageH = box.height;
  if (withStrip && side) stageW -= thumbW + box.gap;
  if (withStrip && !side) stageH -= thumbH + box.gap;
  const big = fitTile(stageW, stageH);
  setPx('--stage-w', big.w);
  setPx('--stage-h', big.h);
  setPx('--thumb-w', thumbW);
  setPx('--thumb-h', thumbH);
}

/** data-speaking on the active speaker's tile (ours too), data-pinned and the pin buttons' state. */
function updateTileMarks() {
  const speaker = huddle.activeSpeaker;
  for (const [id, tile] of tiles) {
    const participantId = id === 'local' ? huddle.self?.id : id;
    if (speaker && participantId === speaker) tile.dataset.speaking = 'true';
    else delete tile.dataset.speaking;
    if (id === 'local') continue;
    if (view.pinned === id) tile.dataset.pinned = 'true';
    else delete tile.dataset.pinned;
    updatePinButton(tile);
  }
}

function updatePinButton(tile) {
  const pin = $('.pin', tile);
  if (!pin) return;
  const pinned = tile.dataset.pinned === 'true';
  const words = `${pinned ? 'Unpin' : 'Pin'} ${tile.dataset.name || 'this participant'}`;
  pin.setAttribute('aria-pressed', String(pinned));
  pin.setAttribute('aria-label', words);
  pin.title = pinned ? 'Unpin' : 'Pin to the large tile';
}

/** Pins a participant (speaker view, large) or, when they are pinned already, unpins them. */
function togglePin(participantId) {
  if (view.pinned === participantId) {
    view.pinned = null;
  } else if (tiles.has(participantId)) {
    view.pinned = participantId;
    view.choice = 'speaker'; // a pinned participant is shown large
  }
  layout();
}

function setLayout(choice) {
  view.choice = choice;
  layout();
}

// --- adaptive stream: how large each remote video is shown (docs/protocol.md, "video_sizes") ---
//
// For every remote tile, the size of its video in device pixels; 0x0 when it is not shown: hidden
// (display: none, e.g. on another gallery page), scrolled out of the strip or the viewport, or the whole tab
// is in the background. HuddleClient.setVideoSizes sends it (SFU mode only, on change, at most every 250 ms).
//
// A ResizeObserver (sizes) and an IntersectionObserver (scrolling in and out of view) say when to measure;
// the measurement itself checks each video against the viewport and its clipping ancestors, as the
// IntersectionObserver does. Its own verdicts can lag: one comes a frame after a layout change, and a video
// shown again (display: none before) but scrolled out of the strip gets none at all (still not intersecting).
const sizeObserver = new ResizeObserver(() => queueVideoSizes());
const visibilityObserver = new IntersectionObserver(() => queueVideoSizes());

function watchVideoSize(video) {
  sizeObserver.observe(video);
  visibilityObserver.observe(video);
}

function unwatchVideoSize(video) {
  sizeObserver.unobserve(video);
  visibilityObserver.unobserve(video);
}

/** Whether some of `element` is on screen: inside the viewport and inside every ancestor that clips. */
function onScreen(element, clips) {
  const rect = element.getBoundingClientRect();
  let left = Math.max(rect.left, 0);
  let top = Math.max(rect.top, 0);
  let right = Math.min(rect.right, window.innerWidth);
  let bottom = Math.min(rect.bottom, window.innerHeight);
  for (let node = element.parentElement; node && node !== document.body; node = node.parentElement) {
    if (!clips.has(node)) {
      const style = getComputedStyle(node);
      const clipping = style.overflowX !== 'visible' || style.overflowY !== 'visible';
      clips.set(node, clipping ? node.getBoundingClientRect() : null);
    }
    const clip = clips.get(node);
    if (!clip) continue;
    left = Math.max(left, clip.left);
    top = Math.max(top, clip.top);
    right = Math.min(right, clip.right);
    bottom = Math.min(bottom, clip.bottom);
  }
  return right > left && bottom > top;
}

function measureVideoSizes() {
  const sizes = {};
  const clips = new Map(); // ancestor -> its clip rectangle (null: it does not clip), for this measurement
  const tabShown = document.visibilityState === 'visible';
  const ratio = window.devicePixelRatio || 1;
  for (const [id, tile] of tiles) {
    if (id === 'local') continue;
    const video = $('video', tile);
    const inView = tabShown && video.clientWidth > 0 && video.clientHeight > 0 && onScreen(video, clips);
    const w = inView ? Math.round(video.clientWidth * ratio) : 0;
    const h = inView ? Math.round(video.clientHeight * ratio) : 0;
    sizes[id] = w > 0 && h > 0 ? [w, h] : [0, 0];
  }
  return sizes;
}

function reportVideoSizes() {
  sizesQueued = false;
  huddle.setVideoSizes(measureVideoSizes());
}

// Observers fire in bursts (one layout change resizes many tiles): one measurement after the burst. Not
// requestAnimationFrame: it does not run in a background tab, which must report 0x0 at once.
let sizesQueued = false;
function queueVideoSizes() {
  if (sizesQueued) return;
  sizesQueued = true;
  setTimeout(reportVideoSizes, 0);
}

document.addEventListener('visibilitychange', reportVideoSizes);

/**
 * TEST HOOK (tests/e2e rely on it): hides (`hidden` attribute) or shows a remote participant's tile, as if it
 * were scrolled away; its video is then reported as 0x0. Returns false when there is no such tile.
 */
window.hideTile = (participantId, hidden = true) => {
  const tile = tiles.get(participantId);
  if (!tile || participantId === 'local') return false;
  tile.hidden = Boolean(hidden);
  layout();
  return true;
};

new ResizeObserver(() => layout()).observe(ui.grid);

// --- header, buttons and panels ---

let statusNoticeTimer = null;

function setStatus(state) {
  clearTimeout(statusNoticeTimer);
  statusNoticeTimer = null;
  ui.status.removeAttribute('title');
  ui.status.dataset.state = state;
  ui.status.textContent = STATUS_WORDS[state] || state;
  document.body.dataset.state = state;
  const inCall = state === 'connecting' || state === 'connected' || state === 'reconnecting';
  ui.leaveButton.disabled = !inCall;
  updateCount();
  updateRecording();
}

/**
 * What just happened, said in place of the status for a few seconds (it fades, then the status is back):
 * in the header, so it covers neither the stage nor the controls, and read out like any status change.
 */
function showStatusNotice(text) {
  setStatus(huddle.state);
  const notice = document.createElement('span');
  notice.className = 'status-notice';
  notice.textContent = text;
  notice.style.animationDuration = `${STATUS_NOTICE_MS}ms`;
  ui.status.replaceChildren(notice);
  ui.status.title = text; // the whole of it where the header is too narrow to show it
  statusNoticeTimer = setTimeout(() => setStatus(huddle.state), STATUS_NOTICE_MS);
}

function updateCount() {
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  ui.count.hidden = !inCall;
  if (inCall) {
    const people = huddle.participants.size + 1;
    ui.count.textContent = people === 1 ? 'Only you' : `${people} people`;
  }
}

function updateLocalState() {
  const tile = tiles.get('local');
  // Before anything is captured the buttons show the preference that join() will apply.
  const captured = Boolean(huddle.localStream) || huddle.mediaError !== null;
  const wanted = huddle.mediaPreferences;
  const audio = captured ? huddle.audioEnabled : wanted.audio;
  const video = captured ? huddle.videoEnabled : wanted.video;
  if (tile) setTileMedia(tile, { audio, video });

  ui.audioButton.setAttribute('aria-pressed', String(!audio));
  ui.audioButton.title = audio ? 'Turn off microphone' : 'Turn on microphone';
  ui.videoButton.setAttribute('aria-pressed', String(!video));
  ui.videoButton.title = video ? 'Turn off camera' : 'Turn on camera';

  // Without a device there is nothing to toggle (before the first capture, allow choosing in advance).
  ui.audioButton.disabled = captured && !huddle.hasAudio;
  ui.videoButton.disabled = captured && !huddle.hasVideo;
}

let errorTimer = null;

function showError(text, { sticky = true } = {}) {
  clearTimeout(errorTimer);
  ui.errorText.textContent = text;
  ui.error.hidden = false;
  if (!sticky) errorTimer = setTimeout(hideError, 8000);
}

function hideError() {
  clearTimeout(errorTimer);
  ui.error.hidden = true;
  ui.errorText.textContent = '';
}

// --- recording (docs/protocol.md, "Recording") ---

let recordingPending = false; // a start or stop is on its way: the button waits for the answer
let recordingSince = 0; // when the running recording started, in this machine's Date.now() terms
let recordingTimer = null;

/** Who started the recording, in words, or null when we cannot say. */
function recordingStarter(startedBy) {
  if (startedBy === 'api') return 'an integration';
  if (startedBy && startedBy === huddle.self?.id) return 'you';
  return huddle.participants.get(startedBy)?.name || null;
}

function elapsedWords(ms) {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  const hours = Math.floor(seconds / 3600);
  const minutes = Math.floor(seconds / 60) % 60;
  const mmss = `${String(minutes).padStart(hours ? 2 : 1, '0')}:${String(seconds % 60).padStart(2, '0')}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

function updateElapsed() {
  ui.recordingElapsed.textContent = recordingSince ? elapsedWords(Date.now() - recordingSince) : '';
}

/** The indicator (everyone, while a recording runs) and the record button (those allowed to record). */
function updateRecording() {
  const recording = huddle.recording;
  const inCall = huddle.state === 'connected' || huddle.state === 'reconnecting';
  const shown = Boolean(recording) && inCall;
  ui.recordingIndicator.hidden = !shown;
  if (shown) {
    const who = recordingStarter(recording.started_by);
    ui.recordingIndicator.title = who ? `Recording started by ${who}` : 'This call is being recorded';
    updateElapsed();
    if (!recordingTimer) recordingTimer = setInterval(updateElapsed, 1000);
  } else {
    clearInterval(recordingTimer);
    recordingTimer = null;
  }

  ui.recordButton.hidden = !(inCall && huddle.permissions?.record === true);
  ui.recordButton.disabled = huddle.state !== 'connected';
  // aria-disabled, not disabled, while waiting: a disabled button would drop the keyboard focus.
  ui.recordButton.setAttribute('aria-disabled', String(recordingPending));
  ui.recordButton.setAttribute('aria-pressed', String(Boolean(recording)));
  ui.recordButton.title = recording ? 'Stop recording' : 'Start recording';
}

function recordingErrorWords({ code, message, request }) {
  if (RECORDING_ERROR_WORDS[code]) return RECORDING_ERROR_WORDS[code];
  const what = request === 'stop_recording' ? 'stop' : 'start';
  if (code === 'connection_lost') {
    // The request may have reached the server before the socket went: only the indicator knows.
    return `The connection to the server was interrupted while asking it to ${what} the recording. `
      + 'Once reconnected, the header shows whether the call is being recorded.';
  }
  return `Could not ${what} the recording. ${sentence(message)}`;
}

function recordingsHref() {
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  return `/r/${encodeURIComponent(room)}/recordings${query}`;
}

function sentence(text) {
  const trimmed = String(text || '').trim();
  if (!trimmed) return 'Something went wrong.';
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function errorWords({ code, message, mediaError }) {
  if (code === 'media_unavailable') {
    if (mediaError === 'NotAllowedError' || mediaError === 'SecurityError') {
      return 'Camera and microphone access is blocked, so others can neither see nor hear you. '
        + 'Allow access in your browser and rejoin.';
    }
    if (mediaError === 'NotFoundError' && !huddle.localStream) {
      return 'No camera or microphone was found, so others can neither see nor hear you.';
    }
    return sentence(message);
  }
  if (code === 'unauthorized' && !token) {
    return 'This call needs an invite link. Ask whoever invited you for one.';
  }
  if (code === 'peer_error') return 'Could not connect to one of the participants.';
  return ERROR_WORDS[code] || sentence(message);
}

function showPanel(panel) {
  for (const candidate of [ui.joinPanel, ui.leftPanel]) candidate.hidden = candidate !== panel;
  document.body.dataset.view = panel === ui.joinPanel ? 'join' : panel === ui.leftPanel ? 'left' : 'call';
  if (panel === ui.joinPanel) ui.nameInput.focus();
  layout();
}

function showLeftPanel(title, note, action) {
  ui.leftTitle.textContent = title;
  ui.leftNote.textContent = note;
  ui.leftNote.hidden = !note;
  ui.rejoin.textContent = action;
  ui.rejoin.hidden = !ROOM_PATTERN.test(room);
  showPanel(ui.leftPanel);
}

function showNameForm(message) {
  ui.nameInput.value = displayName || localStorage.getItem(NAME_KEY) || '';
  ui.nameError.hidden = !message;
  ui.nameError.textContent = message || '';
  showPanel(ui.joinPanel);
}

async function joinCall() {
  hideError();
  showPanel(null);
  localTile();
  if (displayName) setTileName(tiles.get('local'), displayName, true);
  try {
    await huddle.join({ room, name: displayName, token });
  } catch {
    // Reported through the `error` event.
  }
}

// --- client events ---

// The last error, so that the panel after a lost connection can say why.
let lastErrorCode = null;

huddle.addEventListener('state', (event) => {
  const { state } = event.detail;
  setStatus(state);
  if (state === 'connecting') ui.alwaysRelayLater.hidden = true; // a new join uses the setting as it is now
  // While reconnecting, tiles and media stay as they are: the status says "Reconnecting…".
  if (state === 'disconnected') {
    clearRemoteTiles();
    const note = lastErrorCode === 'resume_failed'
      ? 'The connection to the call was lost and could not be restored in time.'
      : 'The connection to the call was lost.';
    showLeftPanel('You are disconnected', note, 'Rejoin');
  } else if (state === 'error' && ui.joinPanel.hidden) {
    clearRemoteTiles();
    showLeftPanel('Could not join the call', '', 'Try again');
  }
});

huddle.addEventListener('joined', (event) => {
  const { self, participants } = event.detail;
  displayName = self.name;
  setTileName(localTile(), self.name, true);
  for (const participant of participants) ensureRemoteTile(participant);
  updateLocalState();
  updateCount();
  updateRecording(); // permissions.record
  // Measured now (not after the observers' turn), so that the SFU's first `video_sizes` names everyone.
  reportVideoSizes();
});

huddle.addEventListener('resumed', (event) => {
  const { restored, moved } = event.detail;
  if (restored) showStatusNotice(moved ? MOVED_WORDS : RESTORED_WORDS);
});

huddle.addEventListener('mode', () => {
  layout();
  reportVideoSizes(); // the SFU transport just started: it sends these at once
});

huddle.addEventListener('active-speaker', (event) => {
  const { id } = event.detail;
  if (id && id !== huddle.self?.id && tiles.has(id)) view.lastSpeaker = id;
  layout(); // the large tile follows the speaker (unless someone is pinned)
});

huddle.addEventListener('recording', (event) => {
  const { recording, previous, reason } = event.detail;
  if (recording) {
    // Seen as it started: our own clock's now. Found running on joining: the server's clock, which may be
    // somewhat off ours (the elapsed time never shows below zero).
    recordingSince = reason === 'started' || !(recording.started_at > 0) ? Date.now() : recording.started_at * 1000;
  } else {
    recordingSince = 0;
  }
  if (reason === 'left') ui.recordingAnnouncer.textContent = '';
  else if (recording) ui.recordingAnnouncer.textContent = 'This call is being recorded';
  else if (previous) ui.recordingAnnouncer.textContent = 'Recording stopped';
  updateRecording();
});

huddle.addEventListener('participant-joined', (event) => {
  ensureRemoteTile(event.detail.participant);
  updateCount();
});

huddle.addEventListener('participant-left', (event) => {
  removeRemoteTile(event.detail.participantId);
  updateCount();
});

huddle.addEventListener('participant-updated', (event) => {
  const { participant, isSelf } = event.detail;
  if (isSelf) {
    updateLocalState();
    return;
  }
  if (tiles.has(participant.id)) ensureRemoteTile(participant);
});

huddle.addEventListener('track', (event) => {
  const { participantId, stream } = event.detail;
  const participant = huddle.participants.get(participantId);
  if (!participant) return;
  const video = $('video', ensureRemoteTile(participant));
  // Setting srcObject again (even to the same stream) makes the element pick up the track just added.
  video.srcObject = stream;
  if (ui.soundBlocked.hidden) video.muted = false;
  playVideo(video);
});

huddle.addEventListener('track-removed', (event) => {
  const tile = tiles.get(event.detail.participantId);
  if (!tile) return;
  const video = $('video', tile);
  // Reassigning srcObject makes the element drop the track that left the stream.
  video.srcObject = event.detail.stream;
  playVideo(video);
});

huddle.addEventListener('peer-state', (event) => {
  const { participantId, connectionState } = event.detail;
  const tile = tiles.get(participantId);
  if (tile) setTileConnection(tile, connectionState);
});

huddle.addEventListener('local-stream', (event) => {
  if (event.detail.stream) showLocalStream(event.detail.stream);
  else {
    const tile = tiles.get('local');
    if (tile) $('video', tile).srcObject = null;
    updateLocalState();
  }
});

huddle.addEventListener('local-media', () => updateLocalState());

huddle.addEventListener('error', (event) => {
  const detail = event.detail;
  if (detail.request === 'start_recording' || detail.request === 'stop_recording') {
    // Answers to the record button: a passing note, as the indicator shows what is true either way.
    // not_recording: someone else stopped it first, which is what was asked for.
    if (detail.code !== 'not_recording') showError(recordingErrorWords(detail), { sticky: false });
    return;
  }
  lastErrorCode = detail.code;
  if (QUIET_ERRORS.has(detail.code)) {
    console.info('huddle:', detail.code, detail.message);
    return;
  }
  if (detail.code === 'invalid_name' && !token) {
    clearRemoteTiles();
    showNameForm(ERROR_WORDS.invalid_name);
    return;
  }
  const transient = detail.code === 'peer_error';
  showError(errorWords(detail), { sticky: !transient });
});

// --- controls ---

ui.audioButton.addEventListener('click', () => {
  huddle.setAudioEnabled(!huddle.audioEnabled);
  updateLocalState();
});

ui.videoButton.addEventListener('click', () => {
  huddle.setVideoEnabled(!huddle.videoEnabled);
  updateLocalState();
});

ui.recordButton.addEventListener('click', async () => {
  if (recordingPending) return;
  recordingPending = true;
  updateRecording();
  try {
    if (huddle.recording) await huddle.stopRecording();
    else await huddle.startRecording();
  } catch {
    // Reported through the `error` event (detail.request).
  } finally {
    recordingPending = false;
    updateRecording();
  }
});

ui.leaveButton.addEventListener('click', () => {
  huddle.leave();
  clearRemoteTiles();
  hideError();
  showLeftPanel('You left the call', 'Rejoin whenever you are ready.', 'Rejoin');
});

ui.rejoin.addEventListener('click', () => {
  if (displayName || token) joinCall();
  else showNameForm();
});

ui.joinForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const name = cleanDisplayName(ui.nameInput.value);
  if (!name) {
    ui.nameError.textContent = ERROR_WORDS.invalid_name;
    ui.nameError.hidden = false;
    ui.nameInput.focus();
    return;
  }
  displayName = name;
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch {
    // private mode: nothing to remember with
  }
  joinCall();
});

ui.error.querySelector('.dismiss').addEventListener('click', hideError);

// --- settings ---

function showSettings(open) {
  ui.settingsPanel.hidden = !open;
  ui.settingsButton.setAttribute('aria-expanded', String(open));
}

ui.settingsButton.addEventListener('click', () => showSettings(ui.settingsPanel.hidden));

document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && !ui.settingsPanel.hidden) {
    showSettings(false);
    ui.settingsButton.focus();
  }
});

document.addEventListener('pointerdown', (event) => {
  if (ui.settingsPanel.hidden) return;
  if (!ui.settingsPanel.contains(event.target) && !ui.settingsButton.contains(event.target)) showSettings(false);
});

ui.alwaysRelay.addEventListener('change', () => {
  const on = ui.alwaysRelay.checked;
  huddle.relayOnly = on;
  try {
    localStorage.setItem(RELAY_KEY, on ? '1' : '0');
  } catch {
    // private mode: it holds for this page only
  }
  // Connections that exist keep their policy (the client reads it when it makes one, from `joined` on).
  ui.alwaysRelayLater.hidden = !['connected', 'reconnecting'].includes(huddle.state);
});

ui.layoutSpeaker.addEventListener('click', () => setLayout('speaker'));
ui.layoutGallery.addEventListener('click', () => setLayout('gallery'));

ui.grid.addEventListener('click', (event) => {
  const pin = event.target.closest('.pin');
  const tile = pin && pin.closest('.tile.remote');
  if (tile) togglePin(tile.dataset.participantId);
});

ui.pagePrev.addEventListener('click', () => {
  view.page -= 1;
  layout();
});

ui.pageNext.addEventListener('click', () => {
  view.page += 1;
  layout();
});

$('#enable-sound').addEventListener('click', () => {
  for (const video of ui.grid.querySelectorAll('.tile.remote video')) {
    video.muted = false;
    delete video.dataset.soundBlocked;
    video.play().catch(() => {});
  }
  ui.soundBlocked.hidden = true;
});

ui.copyLink.addEventListener('click', async () => {
  const link = `${location.origin}/r/${encodeURIComponent(room)}`;
  const label = $('.copy-label', ui.copyLink);
  try {
    await navigator.clipboard.writeText(link);
    label.textContent = 'Copied';
  } catch {
    window.prompt('Copy this link to invite others:', link);
  }
  setTimeout(() => { label.textContent = 'Copy link'; }, 2000);
});

// Tell the others at once when this tab goes away: a socket that closes without `leave` keeps our seat for the
// reconnection grace period (20 s), a closed tab must not.
window.addEventListener('pagehide', () => {
  if (['connected', 'connecting', 'reconnecting'].includes(huddle.state)) huddle.leave();
});

// --- start ---

$('#room-name').textContent = room;
ui.alwaysRelay.checked = huddle.relayOnly;
ui.recordingsLink.href = recordingsHref();
$('.panel-room', ui.joinPanel).textContent = room;
document.title = room ? `${room} · Huddle` : 'Huddle';
setStatus(huddle.state);
updateLocalState();

if (!ROOM_PATTERN.test(room)) {
  // The client refuses it too (state `error`, error `invalid_room`); nothing is captured or sent.
  ui.copyLink.hidden = true;
  ui.recordingsLink.hidden = true;
  huddle.join({ room, name: displayName, token }).catch(() => {});
} else if (displayName || token) {
  joinCall();
} else {
  showNameForm();
}
