/* The media port's compiled batch, as other extension modules reach it (huddle/sfu/_rewrite.c): a capsule
   named huddle.rtc._fastpath._C_API holding this table. A caller writes a datagram straight into the
   batch's next slot, so that a packet is copied once between the publisher's buffer and sendmmsg(2). */

#ifndef HUDDLE_FASTPATH_H
#define HUDDLE_FASTPATH_H

#include <Python.h>

#define HUDDLE_FASTPATH_CAPSULE "huddle.rtc._fastpath._C_API"

/* Each takes a huddle.rtc._fastpath.Route: where a transport's RTP goes (its port's batch, its SRTP
   session, its ICE pair's parsed address). */
typedef struct {
    /* The route's SrtpSession (borrowed) when RTP can go this way now (the route is on and its batch is
       holding), Py_None when not (the reference path sends), NULL with an exception set when `route` is not
       a Route. */
    PyObject *(*srtp)(PyObject *route);
    /* The next free slot of the route's batch, addressed to the route's address; `*room` is how many bytes
       of plain RTP it takes (SRTP's trailer follows). NULL with an exception set when the route is off.
       Nothing is queued until commit(). */
    char *(*reserve)(PyObject *route, Py_ssize_t *room);
    /* Protect the `length` bytes of RTP written into `slot` (what reserve() returned) with the batch's
       srtp_protect for the libsrtp session `session`, and queue them; a full batch is sent at once. 1 when
       queued, 0 when libsrtp refused (the slot stays free), -1 with an exception set when `slot` is no
       longer the next free one (the batch was used in between). */
    int (*commit)(PyObject *route, char *slot, void *session, Py_ssize_t length);
} HuddleFastpathApi;

#endif
