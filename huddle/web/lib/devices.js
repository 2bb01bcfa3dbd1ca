// Local media: the one place that asks the browser for camera and microphone.

export const MEDIA_CONSTRAINTS = Object.freeze({ audio: true, video: { width: 1280, height: 720 } });

const MEDIA_ERROR_WORDS = {
  NotAllowedError: 'access to the camera and microphone was blocked',
  SecurityError: 'access to the camera and microphone was blocked',
  NotFoundError: 'no camera or microphone was found',
  NotReadableError: 'the camera or microphone is in use by another application',
  OverconstrainedError: 'the camera cannot provide the requested video',
  AbortError: 'the camera or microphone could not be started',
  TypeError: 'this browser cannot capture media here (a secure https page is needed)',
};

/**
 * Asks for camera and microphone; when that fails, for the microphone alone, then the camera alone. Resolves
 * with {stream, error}: stream is null when nothing could be captured; error describes what is missing.
 */
export async function captureLocalMedia(constraints) {
  if (!navigator.mediaDevices?.getUserMedia) {
    return { stream: null, error: { name: 'TypeError', words: MEDIA_ERROR_WORDS.TypeError } };
  }
  let firstError;
  try {
    return { stream: await navigator.mediaDevices.getUserMedia(constraints), error: null };
  } catch (err) {
    firstError = err;
  }
  const fatal = ['NotAllowedError', 'SecurityError', 'TypeError'].includes(firstError.name);
  if (!fatal && constraints.audio && constraints.video) {
    for (const partial of [{ audio: constraints.audio }, { video: constraints.video }]) {
      try {
        const stream = await navigator.mediaDevices.getUserMedia(partial);
        const missing = partial.audio ? 'camera' : 'microphone';
        return { stream, error: { name: firstError.name, words: `the ${missing} is not available`, partial: true } };
      } catch {
        // try the next one
      }
    }
  }
  const words = MEDIA_ERROR_WORDS[firstError.name] || `the camera and microphone could not be used (${firstError.message})`;
  return { stream: null, error: { name: firstError.name, words } };
}
