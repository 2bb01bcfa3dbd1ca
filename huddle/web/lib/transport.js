// What the two transports (p2p.js, sfu.js) share.

// A P2P or SFU connection whose ICE failed restarts ICE (a new offer with fresh credentials), at most this
// many times in a row: the new round gathers again, so a TURN allocation that failed the first time (a lost
// Allocate, a stale nonce) gets another chance. With every server in `ice_servers`, ICE pairs direct
// candidates first (by priority) and relayed ones last, so TURN carries the call only where nothing else works.
export const MAX_ICE_RESTARTS = 3;
// iceTransportPolicy values (RTCConfiguration).
export const ICE_ALL = 'all';
export const ICE_RELAY = 'relay';

/** Which way media flows on one m-section, from this side's point of view. */
export function direction(send, receive) {
  if (send && receive) return 'sendrecv';
  if (send) return 'sendonly';
  if (receive) return 'recvonly';
  return 'inactive';
}

/**
 * What both transports are given: ICE servers and policy ('relay': TURN candidates only), local tracks,
 * permissions, and how to signal and report.
 */
export class Transport {
  constructor({ iceServers, iceTransportPolicy = ICE_ALL, localTracks, permissions, send, events }) {
    this.iceServers = iceServers || [];
    this.iceTransportPolicy = iceTransportPolicy;
    this.localTracks = localTracks;
    this.publish = permissions?.publish !== false;
    this.subscribe = permissions?.subscribe !== false;
    this.send = send;
    this.events = events;
  }
}

/** Whether `ice_servers` names a TURN server (a `turn:` or `turns:` URL). */
export function hasTurnServer(iceServers) {
  return (iceServers || []).some((server) => {
    const urls = Array.isArray(server?.urls) ? server.urls : [server?.urls];
    return urls.some((url) => typeof url === 'string' && /^turns?:/i.test(url));
  });
}
