// Tiles: one per person in the call (ours is 'local'), with their video, name, avatar, mute and camera marks,
// a note on their connection and a pin button; and one per screen shared (key '<participant id>~screen',
// "Ada's screen", pinnable like the others; ours is LOCAL_SCREEN, "Your screen", a muted preview). Where a
// tile goes on the page is the stage's business (stage.js): it hears of every tile added or removed
// (onTileChange).

import { $ } from './dom.js';

// Notes on a tile about the media connection it is shown through (peer-state).
const PEER_WORDS = {
  new: 'Connecting…',
  connecting: 'Connecting…',
  disconnected: 'Reconnecting…',
  failed: 'Could not connect',
};

// Notes on a tile about the other person's own connection to the server (participant.connection).
const PARTICIPANT_CONNECTION_WORDS = {
  reconnecting: 'Reconnecting…',
};

const grid = $('#grid');
const strip = $('#strip');
const template = $('#tile-template');
const soundBlocked = $('#sound-blocked');

/** Participant id (or 'local', or a screen share's key) -> tile element, in join order (ours first). */
export const tiles = new Map();

/** The key of our own screen share's preview tile. */
export const LOCAL_SCREEN = 'local~screen';

/** Whether the tile under `id` shows something of ours (our camera, our screen): never sized or staged. */
export function isOwnTile(id) {
  return id === 'local' || id === LOCAL_SCREEN;
}

const listeners = [];

/** `listener(change, id, tile)`, change: 'added' | 'removed', after the tile went in or out of `tiles`. */
export function onTileChange(listener) {
  listeners.push(listener);
}

function tell(change, id, tile) {
  for (const listener of listeners) listener(change, id, tile);
}

function initial(name) {
  const letter = (name || '?').trim().charAt(0);
  return letter ? letter.toUpperCase() : '?';
}

function createTile({ local, participantId, name, screen = false }) {
  const tile = template.content.firstElementChild.cloneNode(true);
  // Our screen's preview is neither 'local' (no mirroring) nor 'remote' (never sized or pinned).
  tile.classList.add(local ? (screen ? 'own-screen' : 'local') : 'remote');
  if (screen) tile.classList.add('screen');
  const video = $('video', tile);
  if (local) {
    video.muted = true; // never play our own microphone (or screen audio) back
    tile.dataset.connection = 'local';
    $('.pin', tile).remove(); // we pin others, not ourselves
  } else {
    tile.dataset.participantId = participantId;
  }
  if (screen) setScreenTileName(tile, name, local);
  else setTileName(tile, name, local);
  grid.insertBefore(tile, strip);
  const id = local ? (screen ? LOCAL_SCREEN : 'local') : participantId;
  tiles.set(id, tile);
  tell('added', id, tile);
  return tile;
}

export function setTileName(tile, name, local) {
  const shown = name || 'Guest';
  tile.dataset.name = shown;
  $('.name', tile).textContent = local ? `${shown} (you)` : shown;
  $('.avatar', tile).textContent = initial(shown);
  updatePinButton(tile);
}

function setScreenTileName(tile, ownerName, local) {
  const shown = local ? 'Your screen' : `${ownerName || 'Guest'}'s screen`;
  tile.dataset.name = shown;
  $('.name', tile).textContent = shown;
  $('.avatar', tile).textContent = initial(ownerName || 'Guest');
  // A screen has no microphone or camera of its own to be off.
  $('.muted-indicator', tile).hidden = true;
  $('.camera-off', tile).hidden = true;
  updatePinButton(tile);
}

/**
 * The tile of a screen share: `key` '<participant id>~screen' for someone's (named after `ownerName`), or
 * LOCAL_SCREEN for ours. Made when there is none yet.
 */
export function ensureScreenTile(key, ownerName) {
  const local = key === LOCAL_SCREEN;
  let tile = tiles.get(key);
  if (!tile) tile = createTile({ local, participantId: key, name: ownerName, screen: true });
  else setScreenTileName(tile, ownerName, local);
  return tile;
}

/** The pin button as data-pinned says (stage.js sets it). */
export function updatePinButton(tile) {
  const pin = $('.pin', tile);
  if (!pin) return;
  const pinned = tile.dataset.pinned === 'true';
  const words = `${pinned ? 'Unpin' : 'Pin'} ${tile.dataset.name || 'this participant'}`;
  pin.setAttribute('aria-pressed', String(pinned));
  pin.setAttribute('aria-label', words);
  pin.title = pinned ? 'Unpin' : 'Pin to the large tile';
}

export function setTileMedia(tile, { audio, video }) {
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
export function setTileConnection(tile, state) {
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

export function playVideo(video) {
  const played = video.play();
  if (!played) return;
  played.catch((err) => {
    if (err.name !== 'NotAllowedError') return;
    // Autoplay with sound was refused: play muted now, offer a button for the sound.
    video.muted = true;
    video.dataset.soundBlocked = 'true';
    video.play().catch(() => {});
    soundBlocked.hidden = false;
  });
}

/** Whether remote videos may play with sound (no autoplay refusal waits for the "enable sound" button). */
export function soundAllowed() {
  return soundBlocked.hidden;
}

export function ensureRemoteTile(participant) {
  let tile = tiles.get(participant.id);
  if (!tile) tile = createTile({ local: false, participantId: participant.id, name: participant.name });
  setTileName(tile, participant.name, false);
  setTileMedia(tile, { audio: participant.audio !== false, video: participant.video !== false });
  setTileParticipantConnection(tile, participant.connection);
  return tile;
}

/** Removes the tile under `participantId` (a participant's, or a screen share's key). */
export function removeRemoteTile(participantId) {
  const tile = tiles.get(participantId);
  if (!tile) return;
  const video = $('video', tile);
  video.srcObject = null;
  tile.remove();
  tiles.delete(participantId);
  tell('removed', participantId, tile);
}

export function clearRemoteTiles() {
  for (const id of [...tiles.keys()]) if (id !== 'local') removeRemoteTile(id);
}

/** Our own tile, made (named `name`) when there is none yet. */
export function localTile(name) {
  return tiles.get('local') || createTile({ local: true, name });
}

$('#enable-sound').addEventListener('click', () => {
  for (const video of grid.querySelectorAll('.tile.remote video')) {
    video.muted = false;
    delete video.dataset.soundBlocked;
    video.play().catch(() => {});
  }
  soundBlocked.hidden = true;
});
