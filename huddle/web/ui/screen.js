// Screen sharing on the call page: the "Share screen" button (its label and data-active follow the share), a
// small muted preview of our own screen ("Your screen", not on our stage), and everyone else's screens as tiles
// of their own ("Ada's screen"), put on the stage when they start (stage.js, noteScreen).

import { $ } from './dom.js';
import { screenKey } from '../lib/screen.js';
import { noteScreen } from './stage.js';
import {
  LOCAL_SCREEN, ensureScreenTile, playVideo, removeRemoteTile, setTileConnection, soundAllowed, tiles,
} from './tiles.js';

const button = $('#toggle-screen');
let huddle = null; // the HuddleClient (initScreenShare)
let asking = false; // the browser's picker is open

function updateButton() {
  const sharing = Boolean(huddle.screen);
  $('.control-label', button).textContent = sharing ? 'Stop sharing' : 'Share screen';
  button.setAttribute('data-active', String(sharing));
  button.title = sharing ? 'Stop sharing your screen' : 'Share your screen';
  const canShare = huddle.state === 'connected' && huddle.permissions?.publish !== false;
  button.disabled = asking || (!sharing && !canShare);
}

async function onClick() {
  if (huddle.screen) {
    huddle.stopScreenShare();
    return;
  }
  asking = true;
  updateButton();
  try {
    // Refusing the picker resolves false: nothing to say. Other failures come as an `error` event.
    await huddle.startScreenShare();
  } finally {
    asking = false;
    updateButton();
  }
}

/** Our own share started (its stream) or stopped (null): the preview tile comes or goes. */
function showOwnScreen(stream) {
  if (!stream) {
    removeRemoteTile(LOCAL_SCREEN);
    return;
  }
  const video = $('video', ensureScreenTile(LOCAL_SCREEN));
  video.srcObject = stream;
  playVideo(video);
}

function showRemoteScreen({ participantId, key, stream, track }) {
  const participant = huddle.participants.get(participantId);
  if (!participant) return;
  const tile = ensureScreenTile(key, participant.name);
  const video = $('video', tile);
  // Setting srcObject again (even to the same stream) makes the element pick up the track just added.
  video.srcObject = stream;
  if (soundAllowed()) video.muted = false;
  playVideo(video);
  // Its media arrives, whichever connection carries it (P2P links report no state under this key).
  if (tile.dataset.connection === 'new') setTileConnection(tile, 'connected');
  if (track.kind === 'video') noteScreen(key);
}

function dropRemoteTrack({ key, stream }) {
  const tile = tiles.get(key);
  if (!tile) return;
  if (stream.getVideoTracks().length === 0) {
    removeRemoteTile(key); // the screen is gone (its audio alone is not worth a tile)
    return;
  }
  const video = $('video', tile);
  video.srcObject = stream;
  playVideo(video);
}

/** The share button and screen tiles of `client` (a HuddleClient) from now on. */
export function initScreenShare(client) {
  huddle = client;
  // Browsers without screen capture (most phones) get no button.
  button.hidden = !navigator.mediaDevices || typeof navigator.mediaDevices.getDisplayMedia !== 'function';
  button.addEventListener('click', onClick);
  for (const type of ['state', 'joined', 'resumed']) huddle.addEventListener(type, updateButton);
  huddle.addEventListener('screen', (event) => {
    showOwnScreen(event.detail.stream);
    updateButton();
  });
  huddle.addEventListener('screen-track', (event) => showRemoteScreen(event.detail));
  huddle.addEventListener('screen-track-removed', (event) => dropRemoteTrack(event.detail));
  huddle.addEventListener('participant-updated', (event) => {
    const { participant, isSelf } = event.detail;
    const key = screenKey(participant.id);
    if (isSelf || !tiles.has(key)) return;
    // They stopped (said before their track is retired), or changed their name.
    if (participant.screen === false) removeRemoteTile(key);
    else ensureScreenTile(key, participant.name);
  });
  huddle.addEventListener('participant-left', (event) => removeRemoteTile(screenKey(event.detail.participantId)));
  updateButton();
}
