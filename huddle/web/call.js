// The call page: turns HuddleClient events into tiles, buttons and messages. All signaling and WebRTC work is
// in client.js; this file only touches the DOM.

import { HuddleClient, ROOM_PATTERN, cleanDisplayName } from './client.js';

const NAME_KEY = 'huddle.name';

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
};

// Errors that need no words for people: retried, or only interesting to developers.
const QUIET_ERRORS = new Set(['rate_limited', 'unknown_participant', 'aborted', 'wrong_mode', 'timeout']);

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

const huddle = new HuddleClient();
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
  } else {
    tile.dataset.participantId = participantId;
  }
  setTileName(tile, name, local);
  ui.grid.append(tile);
  tiles.set(local ? 'local' : participantId, tile);
  layout();
  return tile;
}

function setTileName(tile, name, local) {
  const shown = name || 'Guest';
  tile.dataset.name = shown;
  $('.name', tile).textContent = local ? `${shown} (you)` : shown;
  $('.avatar', tile).textContent = initial(shown);
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
  video.srcObject = null;
  tile.remove();
  tiles.delete(participantId);
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

// --- layout: the largest tiles that fit the stage, Meet-style picture-in-picture for two people ---

function layout() {
  const all = [...ui.grid.children];
  const remotes = all.filter((tile) => tile.classList.contains('remote'));
  const pip = remotes.length === 1 && tiles.has('local');
  ui.grid.classList.toggle('pip', pip);
  const inGrid = pip ? remotes : all;
  const count = Math.max(1, inGrid.length);
  ui.grid.dataset.count = String(all.length);

  const style = getComputedStyle(ui.grid);
  const gap = parseFloat(style.columnGap) || 8;
  const width = ui.grid.clientWidth - (parseFloat(style.paddingLeft) || 0) - (parseFloat(style.paddingRight) || 0);
  const height = ui.grid.clientHeight - (parseFloat(style.paddingTop) || 0) - (parseFloat(style.paddingBottom) || 0);
  if (width <= 0 || height <= 0) return;
  const padRight = parseFloat(style.paddingRight) || 0;
  const padBottom = parseFloat(style.paddingBottom) || 0;
  // Try every column count; the tile takes the cell's shape, kept between 3:4 and 16:9 (videos are cropped
  // to fill it), and the arrangement with the largest tiles wins.
  let best = { w: 0, h: 0 };
  for (let cols = 1; cols <= count; cols += 1) {
    const rows = Math.ceil(count / cols);
    const cellW = (width - gap * (cols - 1)) / cols;
    const cellH = (height - gap * (rows - 1)) / rows;
    const aspect = Math.min(16 / 9, Math.max(3 / 4, cellW / cellH));
    const w = Math.min(cellW, cellH * aspect);
    const h = w / aspect;
    if (w * h > best.w * best.h) best = { w, h };
  }
  ui.grid.style.setProperty('--tile-w', `${Math.floor(best.w)}px`);
  ui.grid.style.setProperty('--tile-h', `${Math.floor(best.h)}px`);
  // The picture-in-picture sits inside the corner of the big tile, not beyond it.
  ui.grid.style.setProperty('--pip-right', `${Math.floor((width - best.w) / 2 + padRight + 14)}px`);
  ui.grid.style.setProperty('--pip-bottom', `${Math.floor((height - best.h) / 2 + padBottom + 14)}px`);
}

new ResizeObserver(() => layout()).observe(ui.grid);

// --- header, buttons and panels ---

function setStatus(state) {
  ui.status.dataset.state = state;
  ui.status.textContent = STATUS_WORDS[state] || state;
  document.body.dataset.state = state;
  const inCall = state === 'connecting' || state === 'connected' || state === 'reconnecting';
  ui.leaveButton.disabled = !inCall;
  updateCount();
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
$('.panel-room', ui.joinPanel).textContent = room;
document.title = room ? `${room} · Huddle` : 'Huddle';
setStatus(huddle.state);
updateLocalState();

if (!ROOM_PATTERN.test(room)) {
  // The client refuses it too (state `error`, error `invalid_room`); nothing is captured or sent.
  ui.copyLink.hidden = true;
  huddle.join({ room, name: displayName, token }).catch(() => {});
} else if (displayName || token) {
  joinCall();
} else {
  showNameForm();
}
