//! Whole events only: while a broken stream may still be continued on another model, the relay
//! sends the events a frame completes and holds back the unfinished rest, so that a cut never
//! leaves half an event with the client.

use bytes::{Bytes, BytesMut};

use super::WINDOW;

/// The unfinished end of the stream so far.
#[derive(Default)]
pub struct WholeEvents {
    tail: BytesMut,
}

/// What of a frame goes out now.
#[derive(Debug, PartialEq)]
pub enum Passed {
    /// Whole events (the held rest of earlier frames first).
    Events(Bytes),
    /// Nothing yet: no event ended.
    Held,
    /// One event grew past the scanner's window without ending: everything held goes out, and
    /// whole events can no longer be promised for this stream.
    Overlong(Bytes),
}

impl WholeEvents {
    /// `data` is the next frame; `boundary` the offset just past the last event it completes
    /// (what `Scanner::feed` returned for it).
    pub fn pass(&mut self, data: Bytes, boundary: Option<usize>) -> Passed {
        if let (true, Some(end)) = (self.tail.is_empty(), boundary) {
            // The frame starts with an event (as upstreams mostly send them): the events it
            // completes go out as they came, without a copy; only the rest of the frame is held.
            self.tail.extend_from_slice(&data[end..]);
            return Passed::Events(data.slice(..end));
        }
        self.tail.extend_from_slice(&data);
        match boundary {
            Some(end) => {
                let keep = data.len() - end;
                Passed::Events(self.tail.split_to(self.tail.len() - keep).freeze())
            }
            None if self.tail.len() > WINDOW => Passed::Overlong(self.take()),
            None => Passed::Held,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tail.is_empty()
    }

    /// The held rest, taken out (a stream that ends without a final blank line).
    pub fn take(&mut self) -> Bytes {
        self.tail.split().freeze()
    }

    /// Forgets the held rest (the stream continues elsewhere).
    pub fn clear(&mut self) {
        self.tail.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::Scanner;

    const STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
        : keep-alive\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\r\n\r\n\
        data: [DONE]\n\n";

    /// Every way of cutting the stream in three: what goes out is always whole events, and all
    /// of it, held rest included, is the stream byte for byte.
    #[test]
    fn only_whole_events_go_out_and_nothing_is_lost() {
        // An event ends at a blank line; a lone `\r` ends a line, so `\r\n\r` ends one too (the
        // `\n` after it belongs to that line break).
        let ends: Vec<usize> = (1..=STREAM.len())
            .filter(|&i| {
                [&b"\n\n"[..], b"\r\n\r", b"\r\n\r\n"]
                    .iter()
                    .any(|e| STREAM[..i].ends_with(e))
            })
            .collect();
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let (mut scanner, mut whole) = (Scanner::new(true), WholeEvents::default());
                let mut out = Vec::new();
                for frame in [&STREAM[..a], &STREAM[a..b], &STREAM[b..]] {
                    let boundary = scanner.feed(frame, |_| {});
                    match whole.pass(Bytes::copy_from_slice(frame), boundary) {
                        Passed::Events(events) => {
                            out.extend_from_slice(&events);
                            assert!(out.is_empty() || ends.contains(&out.len()), "{a} {b}");
                        }
                        Passed::Held => {}
                        Passed::Overlong(_) => panic!("no event here is long"),
                    }
                }
                out.extend_from_slice(&whole.take());
                assert_eq!(out, STREAM, "{a} {b}");
            }
        }
    }

    #[test]
    fn a_frame_of_whole_events_goes_out_without_a_copy() {
        let frame = Bytes::from_static(STREAM);
        let mut scanner = Scanner::new(true);
        let boundary = scanner.feed(&frame, |_| {});
        let Passed::Events(out) = WholeEvents::default().pass(frame.clone(), boundary) else {
            panic!("the frame is whole events");
        };
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
    }
}
