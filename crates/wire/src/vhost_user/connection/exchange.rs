//! The exchanges built on the framing of the parent module: replies and acknowledgements
//! (with the "answered whatever the flags" rules), refusals, and a front-end's request with
//! its reply ([`Connection::request`], [`Connection::call`]). Nothing here reads or writes
//! the socket except through the parent's send and receive paths.

use super::*;

impl Connection {
    /// Answer the request whose header is `to`.
    pub fn send_reply(&self, to: &Header, reply: &Reply) -> Result<(), WireError> {
        reply.validate()?;
        let payload = reply.encode();
        self.send(&to.reply(payload.len() as u32), &payload, &[])
    }

    /// Acknowledge a handled request: if `to` asked for a reply (REPLY_ACK) and is not a
    /// request that has an answer of its own (which is its acknowledgement), send a status,
    /// 0 for success and 1 for failure.
    pub fn ack(&self, to: &Header, ok: bool) -> Result<(), WireError> {
        if to.needs_reply() && !to.is_reply() && self.answer(to).is_none() {
            self.send_reply(to, &Reply::U64(u64::from(!ok)))?;
        }
        Ok(())
    }

    /// Acknowledge several handled requests (see [`Connection::ack`]) with one write, in
    /// order. Requests that did not ask for a status get nothing, as with `ack`.
    pub fn ack_all(&self, acks: &[(Header, bool)]) -> Result<(), WireError> {
        let mut bytes = Vec::with_capacity(acks.len() * (HEADER_SIZE + 8));
        for (to, ok) in acks {
            if to.needs_reply() && !to.is_reply() && self.answer(to).is_none() {
                let payload = Reply::U64(u64::from(!ok)).encode();
                bytes.extend_from_slice(to.reply(payload.len() as u32).as_bytes());
                bytes.extend_from_slice(&payload);
            }
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.send_raw(&bytes, false).map(|_| ())
    }

    /// Whether bytes of a message (or the end of the stream) can be read right now: bytes
    /// already read ahead, or bytes in the socket. The message may still be partial (a
    /// peer writing it in pieces); every peer we know writes whole messages.
    pub fn readable_now(&self) -> bool {
        if self.recv_lock.try_lock().is_some_and(|ra| ra.len() > 0) {
            return true;
        }
        self.socket_readable()
    }

    fn socket_readable(&self) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            &self.sock,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            match rustix::event::poll(&mut fds, Some(&zero)) {
                Ok(n) => return n > 0,
                Err(Errno::INTR) => continue,
                Err(_) => return false,
            }
        }
    }

    /// How a request of this channel is always answered, if it is.
    fn answer(&self, header: &Header) -> Option<Answer> {
        answer_for(self.channel, header)
    }

    /// Answer a message this side refuses (it failed to decode, or is not supported), so the
    /// peer is never left waiting:
    /// - a request answered with a value of its own (GET_FEATURES, GET_CONFIG, ..., see
    ///   [`Answer::Value`]) gets a reply with an empty payload, whatever its flags: the
    ///   failure convention of libvhost-user, which QEMU reports as a bad reply size instead
    ///   of taking a made-up value;
    /// - a request answered with a status of its own ([`Answer::Status`]), and any other that
    ///   set NEED_REPLY, gets a status of 1;
    /// - anything else, and anything flagged as a reply, gets nothing.
    pub fn refuse(&self, header: &Header) -> Result<(), WireError> {
        if header.is_reply() {
            return Ok(());
        }
        match self.answer(header) {
            Some(Answer::Value) => self.send(&header.reply(0), &[], &[]),
            Some(Answer::Status) => self.send_reply(header, &Reply::U64(1)),
            None if header.needs_reply() => self.send_reply(header, &Reply::U64(1)),
            None => Ok(()),
        }
    }

    /// After an error from [`Connection::recv`] that is not fatal, refuse the message it was
    /// about (see [`Connection::refuse`]). Decode errors do not carry the header: refuse those
    /// with `refuse(&raw.header)`.
    pub fn reject(&self, err: &WireError) -> Result<(), WireError> {
        match err.header() {
            Some(h) if !err.is_fatal() => self.refuse(h),
            _ => Ok(()),
        }
    }

    /// A front-end request with its answer, under the call lock: a request that has an answer
    /// of its own (GET_*) returns it; any other is sent with NEED_REPLY (the peer must have
    /// REPLY_ACK) and its status checked (`Ok(None)` for success).
    pub fn request(&self, req: &FrontendRequest) -> Result<Option<Reply>, WireError> {
        let payload = req.encode_payload()?;
        let code = req.req();
        match crate::vhost_user::request::reply_kind(code) {
            Some(kind) => {
                let h = Header::new(code.code(), payload.len() as u32, false);
                self.call(&h, &payload, &req.fds(), kind).map(Some)
            }
            None => {
                let h = Header::new(code.code(), payload.len() as u32, true);
                match self.call(&h, &payload, &req.fds(), ReplyKind::U64)? {
                    Reply::U64(0) => Ok(None),
                    Reply::U64(status) => Err(WireError::PeerFailed {
                        request: code.code(),
                        status,
                    }),
                    _ => Err(WireError::UnexpectedReply {
                        expected: code.code(),
                        got: code.code(),
                        flags: 0,
                    }),
                }
            }
        }
    }

    /// Most requests [`Connection::request_all`] keeps in flight: their replies must fit the
    /// socket buffers, or both sides could block sending.
    pub const MAX_PIPELINED: usize = 128;

    /// Front-end requests that have no answer of their own (UPDATE, INVALIDATE, ...), sent
    /// with NEED_REPLY and pipelined: up to [`Connection::MAX_PIPELINED`] are sent before
    /// their acknowledgements are read, so that a batch costs one round trip instead of one
    /// each. Every reply is read even after a failure (the stream stays in step); the first
    /// failure is returned. A request that has an answer of its own is refused with
    /// [`WireError::UnexpectedReply`] before anything is sent.
    pub fn request_all(&self, reqs: &[FrontendRequest]) -> Result<(), WireError> {
        Self::check_no_answer(reqs)?;
        let _guard = self.call_lock.lock();
        let mut first_err = None;
        for chunk in reqs.chunks(Self::MAX_PIPELINED) {
            let mut sent = Vec::with_capacity(chunk.len());
            if chunk.iter().all(|r| r.fds().is_empty()) {
                // One write for the whole chunk.
                sent = self.send_batch(chunk, true)?;
            } else {
                for r in chunk {
                    let payload = r.encode_payload()?;
                    let h = Header::new(r.req().code(), payload.len() as u32, true);
                    match self.send(&h, &payload, &r.fds()) {
                        Ok(()) => sent.push(h),
                        Err(e) => {
                            first_err.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
            for h in &sent {
                let status = self.recv_reply(h, ReplyKind::U64);
                let err = match status {
                    Ok(Reply::U64(0)) => continue,
                    Ok(Reply::U64(status)) => WireError::PeerFailed {
                        request: h.request,
                        status,
                    },
                    Ok(_) => WireError::UnexpectedReply {
                        expected: h.request,
                        got: h.request,
                        flags: 0,
                    },
                    // The stream is out of step or gone: nothing more can be read.
                    Err(e) => return Err(first_err.unwrap_or(e)),
                };
                first_err.get_or_insert(err);
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Front-end requests that have no answer of their own and carry no descriptors (an
    /// UPDATE pushed ahead of use, say), sent without NEED_REPLY in one write: the peer
    /// applies them in order before anything sent after them, and answers nothing. For
    /// messages whose outcome the sender does not wait for; under the call lock, so that
    /// they never land between a call and its reply.
    pub fn post_all(&self, reqs: &[FrontendRequest]) -> Result<(), WireError> {
        Self::check_no_answer(reqs)?;
        if let Some(r) = reqs.iter().find(|r| !r.fds().is_empty()) {
            return Err(WireError::UnexpectedFds {
                request: r.req().code(),
                got: r.fds().len(),
            });
        }
        let _guard = self.call_lock.lock();
        for chunk in reqs.chunks(Self::MAX_PIPELINED) {
            self.send_batch(chunk, false)?;
        }
        Ok(())
    }

    /// Refuse, before anything is sent, a request that has an answer of its own.
    fn check_no_answer(reqs: &[FrontendRequest]) -> Result<(), WireError> {
        match reqs
            .iter()
            .find(|r| crate::vhost_user::request::reply_kind(r.req()).is_some())
        {
            Some(r) => Err(WireError::UnexpectedReply {
                expected: r.req().code(),
                got: r.req().code(),
                flags: 0,
            }),
            None => Ok(()),
        }
    }

    /// Requests without descriptors, encoded and sent in one write; their headers.
    fn send_batch(
        &self,
        chunk: &[FrontendRequest],
        need_reply: bool,
    ) -> Result<Vec<Header>, WireError> {
        let mut bytes = Vec::with_capacity(chunk.len() * (HEADER_SIZE + 40));
        let mut headers = Vec::with_capacity(chunk.len());
        for r in chunk {
            let payload = r.encode_payload()?;
            let h = Header::new(r.req().code(), payload.len() as u32, need_reply);
            bytes.extend_from_slice(h.as_bytes());
            bytes.extend_from_slice(&payload);
            headers.push(h);
        }
        self.send_raw(&bytes, false)?;
        Ok(headers)
    }

    /// Send a request and receive its reply of kind `kind`, with no other call in between
    /// (concurrent callers are served one at a time). Nobody else may `recv` on this
    /// connection meanwhile.
    pub fn call(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        kind: ReplyKind,
    ) -> Result<Reply, WireError> {
        let _guard = self.call_lock.lock();
        self.send(header, payload, fds)?;
        self.recv_reply(header, kind)
    }

    /// Receive the reply to the request sent with header `sent`, of kind `kind`.
    pub fn recv_reply(&self, sent: &Header, kind: ReplyKind) -> Result<Reply, WireError> {
        let msg = self.recv()?;
        if !msg.header.is_reply() || msg.header.request != sent.request {
            return Err(WireError::UnexpectedReply {
                expected: sent.request,
                got: msg.header.request,
                flags: msg.header.flags,
            });
        }
        if !msg.fds.is_empty() {
            return Err(WireError::UnexpectedFds {
                request: msg.header.request,
                got: msg.fds.len(),
            });
        }
        if msg.payload.is_empty() {
            // The failure form of a request that has a reply of its own.
            return Err(WireError::PeerRefused {
                request: msg.header.request,
            });
        }
        Reply::decode(msg.header.request, kind, &msg.payload)
    }

    /// Receive a REPLY_ACK status for `sent`: `Ok` on 0, [`WireError::PeerFailed`] otherwise.
    pub fn recv_ack(&self, sent: &Header) -> Result<(), WireError> {
        match self.recv_reply(sent, ReplyKind::U64)? {
            Reply::U64(0) => Ok(()),
            Reply::U64(status) => Err(WireError::PeerFailed {
                request: sent.request,
                status,
            }),
            _ => Err(WireError::UnexpectedReply {
                expected: sent.request,
                got: sent.request,
                flags: 0,
            }),
        }
    }
}
