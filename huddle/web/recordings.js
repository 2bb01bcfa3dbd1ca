// The recordings page (/r/{room}/recordings): the room's recordings, newest first, with a download link per
// file and a play button per video or audio file, which plays it here, in a player under the recording's
// files (one at a time). Reads GET /api/rooms/{room}/recordings (docs/protocol.md, "Recording"); while one
// is still being made or finished, it asks again every few seconds.

import { ROOM_PATTERN } from './client.js';

const REFRESH_MS = 3000; // while some recording is not stored yet
const RETRY_MS = 10000; // after a failed request
const COMPOSITE_FILE = 'speaker-view.mp4';
const MANIFEST_FILE = 'manifest.json';
const PLAYABLE = /\.(webm|mp4)$/i;

const STATE_WORDS = {
  recording: 'Recording now',
  processing: 'Being finished',
  uploading: 'Being stored',
  stored: 'Ready',
  failed: 'Failed',
};

// Said under a recording whose files are not all there (yet).
const FILES_NOTES = {
  recording: 'Its files can be downloaded here once the recording has stopped.',
  processing: 'Its files are being finished and stored; they appear here as they are ready.',
  uploading: 'Its files are finished and on their way to the store; they appear here as they arrive.',
  failed: 'Its files could not be finished.',
};

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  status: $('#recordings-status'),
  list: $('#recordings-list'),
  template: $('#recording-template'),
  playerTemplate: $('#player-template'),
};

function roomFromPath() {
  const match = location.pathname.match(/^\/r\/([^/]+)\/recordings\/?$/);
  if (!match) return '';
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1];
  }
}

const room = roomFromPath();
const token = new URLSearchParams(location.search).get('token') || undefined;
// Whether this page's link may download files (the list says; with a token, only its `download` permission).
let canDownload = true;

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

/** A path on this server, with the page's token when it has one (downloads need it as the list does). */
function withToken(path) {
  const url = new URL(path, location.origin);
  if (token) url.searchParams.set('token', token);
  return url.pathname + url.search;
}

/**
 * When a recording started, as a Date: `started_at` when the server still knows it, else from the id, which
 * begins with the start time in UTC ("20261125T120301Z-ab12cd"). Null when neither says.
 */
function startOf(recording) {
  if (recording.started_at > 0) return new Date(recording.started_at * 1000);
  const match = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z/.exec(recording.id);
  if (!match) return null;
  const [year, month, day, hours, minutes, seconds] = match.slice(1).map(Number);
  return new Date(Date.UTC(year, month - 1, day, hours, minutes, seconds));
}

function durationWords(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor(total / 60) % 60;
  const mmss = `${String(minutes).padStart(hours ? 2 : 1, '0')}:${String(total % 60).padStart(2, '0')}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

const SIZE_UNITS = ['kilobyte', 'megabyte', 'gigabyte', 'terabyte'];

function sizeWords(bytes) {
  if (!(bytes >= 0)) return '';
  if (bytes < 1000) return `${bytes} ${bytes === 1 ? 'byte' : 'bytes'}`;
  let value = bytes / 1000;
  let unit = 0;
  while (value >= 1000 && unit < SIZE_UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return new Intl.NumberFormat(undefined, {
    style: 'unit', unit: SIZE_UNITS[unit], unitDisplay: 'short', maximumFractionDigits: value < 10 ? 1 : 0,
  }).format(value);
}

/** The file's name without its segment's folder ("segment-2/speaker-view.mp4" → "speaker-view.mp4"). */
function baseName(file) {
  return file.name.split('/').pop();
}

/** Whose track a file is, when the list says (from the recording's manifest): their name, else ''. */
function personOf(file) {
  return typeof file.participant_name === 'string' ? file.participant_name.trim() : '';
}

/** Audio or video: the list says for a track file; the name says too ("…-audio-1.webm"). */
function kindOf(file) {
  if (file.kind === 'audio' || file.kind === 'video') return file.kind;
  const kind = /-(audio|video)-\d+\.webm$/.exec(baseName(file));
  return kind ? kind[1] : '';
}

// What a track carries, in words, by its `source` (docs/protocol.md); without one, by its kind.
const SOURCE_WORDS = {
  microphone: 'microphone', camera: 'camera', screen: 'screen', screen_audio: 'screen audio',
};

function sourceWords(file, kind) {
  return SOURCE_WORDS[file.source] || (kind === 'audio' ? 'microphone' : 'camera');
}

/** What a file holds, in words: the names the server gives them (docs/protocol.md, "Recording"). */
function fileWords(file) {
  const name = baseName(file);
  if (name === COMPOSITE_FILE) return 'Speaker view: the whole call in one video';
  if (name === MANIFEST_FILE) return 'How the track files line up in time';
  const kind = kindOf(file);
  if (!kind) return '';
  return `${personOf(file) || 'One person'}’s ${file.source ? sourceWords(file, kind) : kind}`;
}

/**
 * What a playable file shows, for its play button ("Play …") and its player: "speaker view",
 * "Ada's camera", with the segment ("part 2") of a recording that went on after a restart, and the number
 * of a second file of one person's camera (they left and came back).
 */
function playWords(file) {
  const name = baseName(file);
  const segment = /^segment-(\d+)\//.exec(file.name);
  const part = segment ? `, part ${segment[1]}` : '';
  if (name === COMPOSITE_FILE) return `speaker view${part}`;
  const person = personOf(file);
  const kind = kindOf(file);
  if (!person || !kind) return `${name}${part}`;
  const again = /-(\d+)\.webm$/.exec(name);
  const number = again && again[1] !== '1' ? ` ${again[1]}` : '';
  // A straight apostrophe: the label is what a person says to voice control, or types to find it.
  return `${person}'s ${sourceWords(file, kind)}${number}${part}`;
}

/** The speaker view first (the file most people want), then the tracks, the manifest last. */
function fileOrder(file) {
  if (file.name === COMPOSITE_FILE) return 0;
  return file.name === MANIFEST_FILE ? 2 : 1;
}

function renderFiles(element, files, recordingId) {
  const sorted = [...files].sort((a, b) => fileOrder(a) - fileOrder(b) || a.name.localeCompare(b.name));
  element.replaceChildren(...sorted.map((file) => {
    const item = document.createElement('li');
    if (canDownload) {
      const link = document.createElement('a');
      link.className = 'download';
      link.href = withToken(file.url);
      link.download = file.name;
      link.textContent = file.name;
      item.append(link);
      // Playing reads the same URL as downloading: offered to those who may download.
      if (PLAYABLE.test(file.name)) item.append(playButton(recordingId, file));
    } else {
      const name = document.createElement('span');
      name.textContent = file.name;
      item.append(name);
    }
    const words = [fileWords(file), sizeWords(file.size)].filter(Boolean).join(' · ');
    if (words) {
      const note = document.createElement('span');
      note.className = 'file-note';
      note.textContent = words;
      item.append(note);
    }
    return item;
  }));
}

// --- the player: one at a time, under the files of the recording it plays from ---

let player = null; // {key, element, video, recordingId}: the open player

const playerKey = (recordingId, file) => `${recordingId}/${file.name}`;

function playButton(recordingId, file) {
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'small-button play-button';
  button.textContent = `Play ${playWords(file)}`;
  button.dataset.player = playerKey(recordingId, file);
  const open = player !== null && player.key === button.dataset.player;
  button.setAttribute('aria-expanded', String(open));
  if (open) button.setAttribute('aria-controls', player.element.id);
  button.addEventListener('click', () => {
    if (player !== null && player.key === button.dataset.player) closePlayer(true);
    else openPlayer(recordingId, file);
  });
  return button;
}

/** The play button of the open player, as shown now (a refresh of the list makes new buttons). */
function playerButton() {
  if (player === null) return null;
  return [...document.querySelectorAll('.play-button')].find((b) => b.dataset.player === player.key) || null;
}

function openPlayer(recordingId, file) {
  const item = items.get(recordingId);
  if (!item) return;
  closePlayer(false);
  const element = ui.playerTemplate.content.firstElementChild.cloneNode(true);
  const what = playWords(file);
  element.id = `player-${Date.now()}`;
  element.setAttribute('aria-label', `Player: ${what}`);
  $('.player-title', element).textContent = what.charAt(0).toUpperCase() + what.slice(1);
  const video = $('video', element);
  video.setAttribute('aria-label', what);
  const error = $('.player-error', element);
  video.addEventListener('error', () => {
    error.textContent = 'This browser cannot play this file. Download it instead.';
    error.hidden = false;
  });
  $('.player-close', element).addEventListener('click', () => closePlayer(true));
  element.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') {
      event.preventDefault();
      closePlayer(true);
    }
  });
  video.src = withToken(file.url);
  $('.files', item.element).after(element);
  player = { key: playerKey(recordingId, file), element, video, recordingId };
  const button = playerButton();
  if (button) {
    button.setAttribute('aria-expanded', 'true');
    button.setAttribute('aria-controls', element.id);
  }
  video.focus();
  // Pressing Play is the user's gesture, so the browser lets it start with sound; if not, its controls do.
  video.play().catch(() => {});
}

/** Close the open player; `refocus`: put the focus back on its play button (closed from the keyboard). */
function closePlayer(refocus) {
  if (player === null) return;
  const { element, video } = player;
  const button = playerButton();
  player = null;
  video.pause();
  // Without its source the element lets go of the connection and the buffered media.
  video.removeAttribute('src');
  video.load();
  element.remove();
  if (button) {
    button.setAttribute('aria-expanded', 'false');
    button.removeAttribute('aria-controls');
    if (refocus) button.focus();
  }
}

function setText(element, text) {
  // Only on change: screen readers and text selection are left alone by the refreshes.
  if (element.textContent !== text) element.textContent = text;
}

// --- the list ---

const items = new Map(); // recording id -> {element, files: JSON of its files as last shown, startedAt, stoppedAt}

/** One recording's entry, updated in place, so that a refresh moves neither the focus nor the page. */
function renderRecording(recording) {
  let item = items.get(recording.id);
  if (!item) {
    const element = ui.template.content.firstElementChild.cloneNode(true);
    element.dataset.id = recording.id;
    item = { element, files: null, startedAt: 0, stoppedAt: 0 };
    items.set(recording.id, item);
  }
  const { element } = item;
  const state = STATE_WORDS[recording.state] ? recording.state : 'stored';
  element.dataset.state = state;
  // The server knows a recording's times only until it is stored: those seen by an earlier load still hold.
  if (recording.started_at > 0) item.startedAt = recording.started_at;
  if (recording.stopped_at > 0) item.stoppedAt = recording.stopped_at;
  const { startedAt, stoppedAt } = item;

  const started = startOf({ id: recording.id, started_at: startedAt });
  const time = $('time', element);
  setText(time, started ? dateFormat.format(started) : recording.id);
  if (started) time.dateTime = started.toISOString();
  setText($('.recording-state', element), STATE_WORDS[state]);

  let meta = '';
  if (startedAt > 0 && stoppedAt > 0) {
    meta = `Duration ${durationWords(stoppedAt - startedAt)}`;
  } else if (state === 'recording' && startedAt > 0) {
    meta = `Running for ${durationWords(Date.now() / 1000 - startedAt)}`;
  }
  const metaElement = $('.recording-meta', element);
  setText(metaElement, meta);
  metaElement.hidden = !meta;

  const files = Array.isArray(recording.files) ? recording.files : [];
  const signature = JSON.stringify([canDownload, files]);
  if (signature !== item.files) {
    renderFiles($('.files', element), files, recording.id);
    item.files = signature;
    // A player whose file is gone from the list (or may no longer be downloaded) goes with it.
    if (player !== null && player.recordingId === recording.id && !playerButton()) closePlayer(false);
  }
  $('.files', element).hidden = files.length === 0;
  const note = $('.files-note', element);
  const noteWords = FILES_NOTES[state] || (files.length === 0 ? 'No files.' : '');
  setText(note, noteWords);
  note.hidden = !noteWords;
  return element;
}

function render(recordings) {
  const shown = new Set();
  let previous = null;
  for (const recording of recordings) {
    if (!recording || typeof recording.id !== 'string') continue;
    const element = renderRecording(recording);
    shown.add(recording.id);
    // Insert or move only what is out of place: moving an element would take the focus out of it.
    const wanted = previous ? previous.nextElementSibling : ui.list.firstElementChild;
    if (wanted !== element) ui.list.insertBefore(element, wanted);
    previous = element;
  }
  for (const [id, item] of items) {
    if (shown.has(id)) continue;
    if (player !== null && player.recordingId === id) closePlayer(false);
    item.element.remove();
    items.delete(id);
  }
}

// --- loading ---

let refreshTimer = null;
let pendingBefore = new Set(); // ids not stored yet at the last load

function scheduleLoad(ms) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(load, ms);
}

async function load() {
  let response;
  try {
    response = await fetch(withToken(`/api/rooms/${encodeURIComponent(room)}/recordings`), {
      cache: 'no-store', headers: { Accept: 'application/json' },
    });
  } catch {
    setText(ui.status, 'Could not reach the Huddle server. Trying again…');
    scheduleLoad(RETRY_MS);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    // Asking again would not help: the link itself is wrong (or expired).
    render([]);
    setText(ui.status, 'This link does not give access to the room’s recordings.');
    return;
  }
  let body = null;
  if (response.ok) {
    try {
      body = await response.json();
    } catch {
      body = null;
    }
  }
  if (!body || !Array.isArray(body.recordings)) {
    setText(ui.status, `Could not load the recordings (HTTP ${response.status}). Trying again…`);
    scheduleLoad(RETRY_MS);
    return;
  }

  canDownload = body.download !== false;
  // Newest first, as the server sends them; sorted here too, so that the page does not depend on it.
  const recordings = [...body.recordings].sort((a, b) => String(b.id).localeCompare(String(a.id)));
  render(recordings);
  const pending = new Set(recordings.filter((r) => ['recording', 'processing', 'uploading'].includes(r.state))
    .map((r) => r.id));
  const ready = recordings.filter((r) => pendingBefore.has(r.id) && r.state === 'stored');
  pendingBefore = pending;

  let status = '';
  if (recordings.length === 0) status = 'There are no recordings of this room yet.';
  else if (ready.length === 1) status = 'A recording is ready to download.';
  else if (ready.length > 1) status = `${ready.length} recordings are ready to download.`;
  else if (pending.size > 0) status = 'This list updates itself while a recording is being made or finished.';
  if (!canDownload && recordings.length > 0) {
    status = `${status} This link does not allow downloading them: ask for one that does.`.trim();
  }
  setText(ui.status, status);
  if (pending.size > 0) scheduleLoad(REFRESH_MS);
}

// --- start ---

$('#room-name').textContent = room;
document.title = room ? `Recordings of ${room} · Huddle` : 'Recordings · Huddle';

if (ROOM_PATTERN.test(room)) {
  load();
} else {
  setText(ui.status, 'This room name is not allowed. Room names are 1–64 letters, digits, “-” or “_”.');
}
