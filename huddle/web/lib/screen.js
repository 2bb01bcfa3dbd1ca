// Screen sharing: capturing a screen, window or tab, how its sender is set up, and how a screen share's stream
// is named (docs/protocol.md: a remote screen's stream id is `<participant id>~screen`; so is its tile's key
// and its `video_sizes` key).

// One encoding, up to this bitrate: text stays sharp (detail over frame rate) rather than being scaled down.
export const SCREEN_MAX_BITRATE = 2_500_000;
const SCREEN_DEGRADATION = 'maintain-resolution';
const SCREEN_SUFFIX = '~screen';

/** The key of `participantId`'s screen share (stream id in SFU mode, tile, `video_sizes`). */
export function screenKey(participantId) {
  return `${participantId}${SCREEN_SUFFIX}`;
}

/** The participant whose screen share `key` is ('<participant id>~screen'), or null for any other key. */
export function screenOwner(key) {
  if (typeof key !== 'string' || !key.endsWith(SCREEN_SUFFIX)) return null;
  const owner = key.slice(0, -SCREEN_SUFFIX.length);
  return owner && !owner.includes('~') ? owner : null;
}

/**
 * Asks the browser for a screen, window or tab, with its audio where the browser gives it. Resolves with
 * {video, audio, stream} (audio may be null), or null when the person closed the picker or refused.
 */
export async function captureScreen() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: true });
  } catch (err) {
    if (err.name === 'NotAllowedError' || err.name === 'AbortError') return null;
    throw err;
  }
  const video = stream.getVideoTracks()[0] || null;
  const audio = stream.getAudioTracks()[0] || null;
  if (!video) {
    for (const track of stream.getTracks()) track.stop();
    return null;
  }
  // Slides and code: keep the detail, drop frames when short of bandwidth.
  if ('contentHint' in video) video.contentHint = 'detail';
  return { video, audio, stream };
}

/**
 * A screen share's sender: detail over frame rate (its size kept when bandwidth or CPU run short). Not fatal
 * where the browser refuses it: the share still goes, as the browser sees fit.
 */
export async function setScreenDegradation(sender) {
  try {
    const parameters = sender.getParameters();
    parameters.degradationPreference = SCREEN_DEGRADATION;
    await sender.setParameters(parameters);
  } catch (err) {
    console.warn("huddle: could not set the screen share's degradation preference", err);
  }
}
