// The call's own controls: microphone and camera (and our tile's marks for them), and the invite link.

import { $ } from './dom.js';
import { playVideo, setTileMedia, tiles } from './tiles.js';

const ui = {
  audioButton: $('#toggle-audio'),
  videoButton: $('#toggle-video'),
  audioLabel: $('#toggle-audio .control-label'),
  videoLabel: $('#toggle-video .control-label'),
  copyLink: $('#copy-link'),
};

let huddle = null; // the HuddleClient (initControls)

/** The microphone and camera buttons, and our tile's marks, as the client says they are. */
export function updateLocalState() {
  const tile = tiles.get('local');
  // Before anything is captured the buttons show the preference that join() will apply.
  const captured = Boolean(huddle.localStream) || huddle.mediaError !== null;
  const wanted = huddle.mediaPreferences;
  const audio = captured ? huddle.audioEnabled : wanted.audio;
  const video = captured ? huddle.videoEnabled : wanted.video;
  if (tile) setTileMedia(tile, { audio, video });

  // The label says what a press does; data-active (the red icon) that the microphone or camera is off. No
  // aria-pressed: "Unmute, pressed" would contradict the label.
  ui.audioButton.setAttribute('data-active', String(!audio));
  ui.audioLabel.textContent = audio ? 'Mute' : 'Unmute';
  ui.audioButton.title = audio ? 'Turn off microphone' : 'Turn on microphone';
  ui.videoButton.setAttribute('data-active', String(!video));
  ui.videoLabel.textContent = video ? 'Stop video' : 'Start video';
  ui.videoButton.title = video ? 'Turn off camera' : 'Turn on camera';

  // Without a device there is nothing to toggle (before the first capture, allow choosing in advance).
  ui.audioButton.disabled = captured && !huddle.hasAudio;
  ui.videoButton.disabled = captured && !huddle.hasVideo;
}

/** Our camera's stream in our tile (`tile`), or none. */
function showLocalStream(tile, stream) {
  const video = $('video', tile);
  if (video.srcObject !== stream) video.srcObject = stream;
  if (stream) playVideo(video);
  updateLocalState();
}

/**
 * The controls of `client` (a HuddleClient) from now on. `localTile()`: our tile (made if there is none);
 * `room`: the room the invite link is for.
 */
export function initControls(client, { localTile, room }) {
  huddle = client;
  ui.audioButton.addEventListener('click', () => {
    huddle.setAudioEnabled(!huddle.audioEnabled);
    updateLocalState();
  });

  ui.videoButton.addEventListener('click', () => {
    huddle.setVideoEnabled(!huddle.videoEnabled);
    updateLocalState();
  });

  huddle.addEventListener('local-stream', (event) => {
    if (event.detail.stream) {
      showLocalStream(localTile(), event.detail.stream);
    } else {
      const tile = tiles.get('local');
      if (tile) $('video', tile).srcObject = null;
      updateLocalState();
    }
  });

  huddle.addEventListener('local-media', () => updateLocalState());

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
}

/** For a room name that cannot be joined: nothing to invite to. */
export function hideCopyLink() {
  ui.copyLink.hidden = true;
}
