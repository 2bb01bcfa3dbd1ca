// What the client reads from getStats().

/**
 * Whether media is really arriving through `receiver` (an RTCRtpReceiver of `track`): for video at least one
 * decoded frame, for audio at least one packet. Where the browser gives no stats, an unmuted track counts.
 */
export async function mediaArrives(receiver, track) {
  try {
    const stats = await receiver.getStats();
    let flowing = false;
    stats.forEach((report) => {
      if (report.type !== 'inbound-rtp') return;
      if (track.kind === 'video' ? report.framesDecoded > 0 : report.packetsReceived > 0) flowing = true;
    });
    return flowing;
  } catch {
    return !track.muted;
  }
}
