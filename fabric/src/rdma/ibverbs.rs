//! [`Verbs`] on a real device through ibverbs (`rdma-sys`): one
//! reliable-connected queue pair with one completion queue. Built and
//! compile-checked; no RDMA device was available to run it (see the
//! module above).
//!
//! Connecting: each side opens an [`IbvVerbs`], exchanges its
//! [`QpInfo`] with the peer out of band (the node link's TCP connection
//! does it), and calls [`IbvVerbs::connect`] with the peer's.

use std::ffi::CStr;
use std::io;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::{Completion, Op, Verbs};

/// Names of the RDMA devices on this machine (empty: none, so node links
/// use TCP).
pub fn devices() -> Vec<String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list returns an array of `n` device pointers
    // (or null), which we read and then free exactly once.
    unsafe {
        let list = ibv_get_device_list(&mut n);
        if list.is_null() {
            return Vec::new();
        }
        let names = (0..n.max(0) as usize)
            .map(|i| {
                CStr::from_ptr(ibv_get_device_name(*list.add(i)))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        ibv_free_device_list(list);
        names
    }
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInfo {
    pub qp_num: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    pub psn: u32,
}

impl QpInfo {
    const BYTES: usize = 4 + 2 + 16 + 4;

    /// The bytes a node link's handshake carries.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::BYTES);
        b.extend_from_slice(&self.qp_num.to_le_bytes());
        b.extend_from_slice(&self.lid.to_le_bytes());
        b.extend_from_slice(&self.gid);
        b.extend_from_slice(&self.psn.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<QpInfo> {
        if b.len() != Self::BYTES {
            return None;
        }
        Some(QpInfo {
            qp_num: u32::from_le_bytes(b[0..4].try_into().ok()?),
            lid: u16::from_le_bytes(b[4..6].try_into().ok()?),
            gid: b[6..22].try_into().ok()?,
            psn: u32::from_le_bytes(b[22..26].try_into().ok()?),
        })
    }
}

/// One end of a reliable-connected queue pair.
pub struct IbvVerbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    port: u8,
    mrs: Vec<*mut ibv_mr>,
    wc: Vec<ibv_wc>,
}

// SAFETY: the verbs objects belong to this end alone and are used by one
// thread at a time (it moves with its link); libibverbs is thread-safe.
unsafe impl Send for IbvVerbs {}

fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl IbvVerbs {
    /// Opens `device` (port 1) with queues `depth` deep.
    pub fn open(device: &str, depth: u32) -> io::Result<IbvVerbs> {
        let mut n = 0;
        // SAFETY: plain ibverbs setup; every pointer is checked before use
        // and released in Drop (or here, on failure, by that Drop).
        unsafe {
            let list = ibv_get_device_list(&mut n);
            if list.is_null() {
                return Err(last_error("ibv_get_device_list"));
            }
            let found = (0..n.max(0) as usize)
                .map(|i| *list.add(i))
                .find(|d| CStr::from_ptr(ibv_get_device_name(*d)).to_string_lossy() == device);
            let ctx = found.map_or(ptr::null_mut(), |d| ibv_open_device(d));
            ibv_free_device_list(list);
            if ctx.is_null() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("cannot open RDMA device {device}"),
                ));
            }
            let mut me = IbvVerbs {
                ctx,
                pd: ptr::null_mut(),
                cq: ptr::null_mut(),
                qp: ptr::null_mut(),
                port: 1,
                mrs: Vec::new(),
                wc: (0..64).map(|_| std::mem::zeroed()).collect(),
            };
            me.pd = ibv_alloc_pd(ctx);
            if me.pd.is_null() {
                return Err(last_error("ibv_alloc_pd"));
            }
            me.cq = ibv_create_cq(ctx, (2 * depth) as i32, ptr::null_mut(), ptr::null_mut(), 0);
            if me.cq.is_null() {
                return Err(last_error("ibv_create_cq"));
            }
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = me.cq;
            init.recv_cq = me.cq;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.cap.max_send_wr = depth;
            init.cap.max_recv_wr = depth;
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            me.qp = ibv_create_qp(me.pd, &mut init);
            if me.qp.is_null() {
                return Err(last_error("ibv_create_qp"));
            }
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = me.port;
            attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            if ibv_modify_qp(me.qp, &mut attr, mask.0 as i32) != 0 {
                return Err(last_error("ibv_modify_qp to INIT"));
            }
            Ok(me)
        }
    }

    /// This end's queue pair, for the peer's [`IbvVerbs::connect`].
    pub fn info(&self) -> io::Result<QpInfo> {
        // SAFETY: ctx and qp are valid (open succeeded); the out-structs
        // are plain data.
        unsafe {
            let mut port: ibv_port_attr = std::mem::zeroed();
            if ___ibv_query_port(self.ctx, self.port, &mut port) != 0 {
                return Err(last_error("ibv_query_port"));
            }
            let mut gid: ibv_gid = std::mem::zeroed();
            if ibv_query_gid(self.ctx, self.port, 0, &mut gid) != 0 {
                return Err(last_error("ibv_query_gid"));
            }
            Ok(QpInfo {
                qp_num: (*self.qp).qp_num,
                lid: port.lid,
                gid: gid.raw,
                psn: rand::random::<u32>() & 0xff_ffff,
            })
        }
    }

    /// Connects to the peer's queue pair (INIT → RTR → RTS). `me` is what
    /// [`IbvVerbs::info`] gave (and the peer got).
    pub fn connect(&mut self, me: &QpInfo, peer: &QpInfo) -> io::Result<()> {
        // SAFETY: qp is valid; the attribute structs are plain data.
        unsafe {
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
            attr.path_mtu = ibv_mtu::IBV_MTU_1024;
            attr.dest_qp_num = peer.qp_num;
            attr.rq_psn = peer.psn;
            attr.max_dest_rd_atomic = 1;
            attr.min_rnr_timer = 12;
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = peer.gid;
            attr.ah_attr.grh.hop_limit = 1;
            attr.ah_attr.dlid = peer.lid;
            attr.ah_attr.port_num = self.port;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            if ibv_modify_qp(self.qp, &mut attr, mask.0 as i32) != 0 {
                return Err(last_error("ibv_modify_qp to RTR"));
            }
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
            attr.sq_psn = me.psn;
            attr.timeout = 14;
            attr.retry_cnt = 7;
            attr.rnr_retry = 7;
            attr.max_rd_atomic = 1;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            if ibv_modify_qp(self.qp, &mut attr, mask.0 as i32) != 0 {
                return Err(last_error("ibv_modify_qp to RTS"));
            }
        }
        Ok(())
    }

    fn mr(&self, key: u32) -> io::Result<*mut ibv_mr> {
        self.mrs
            .get(key as usize)
            .copied()
            .filter(|m| !m.is_null())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unregistered region"))
    }

    fn sge(&self, key: u32, offset: usize, len: usize) -> io::Result<ibv_sge> {
        let mr = self.mr(key)?;
        // SAFETY: a registered MR stays valid until deregistered.
        let (addr, size, lkey) = unsafe { ((*mr).addr as u64, (*mr).length, (*mr).lkey) };
        if offset + len > size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "outside the region",
            ));
        }
        Ok(ibv_sge {
            addr: addr + offset as u64,
            length: len as u32,
            lkey,
        })
    }
}

impl Verbs for IbvVerbs {
    fn register(&mut self, region: &mut [u8]) -> io::Result<u32> {
        // SAFETY: the caller keeps `region` alive and in place until it
        // deregisters it (the trait's contract).
        let mr = unsafe {
            ibv_reg_mr(
                self.pd,
                region.as_mut_ptr().cast(),
                region.len(),
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        if mr.is_null() {
            return Err(last_error("ibv_reg_mr"));
        }
        self.mrs.push(mr);
        Ok(self.mrs.len() as u32 - 1)
    }

    fn deregister(&mut self, key: u32) {
        if let Some(mr) = self.mrs.get_mut(key as usize) {
            if !mr.is_null() {
                // SAFETY: registered by us, deregistered once.
                unsafe { ibv_dereg_mr(*mr) };
                *mr = ptr::null_mut();
            }
        }
    }

    fn post_recv(&mut self, wr_id: u64, key: u32, offset: usize, len: usize) -> io::Result<()> {
        let mut sge = self.sge(key, offset, len)?;
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: wr and sge live across the call, which copies them.
        if unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) } != 0 {
            return Err(last_error("ibv_post_recv"));
        }
        Ok(())
    }

    fn post_send(
        &mut self,
        wr_id: u64,
        key: u32,
        offset: usize,
        len: usize,
        imm: u32,
    ) -> io::Result<()> {
        let mut sge = self.sge(key, offset, len)?;
        // SAFETY: a zeroed send WR is a valid empty one; the fields set
        // below make it a signaled SEND_WITH_IMM of one SGE.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        let mut bad = ptr::null_mut();
        // SAFETY: wr and sge live across the call, which copies them.
        if unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) } != 0 {
            return Err(last_error("ibv_post_send"));
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, wait: Duration) -> io::Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: `wc` has room for the entries asked for.
            let n = unsafe { ibv_poll_cq(self.cq, self.wc.len() as i32, self.wc.as_mut_ptr()) };
            if n < 0 {
                return Err(last_error("ibv_poll_cq"));
            }
            for wc in &self.wc[..n as usize] {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    // Flushed or retry-exceeded: the connection is gone.
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("work completion failed with status {}", wc.status),
                    ));
                }
                let recv = wc.opcode & ibv_wc_opcode::IBV_WC_RECV != 0;
                out.push(Completion {
                    wr_id: wc.wr_id,
                    op: if recv { Op::Recv } else { Op::Send },
                    len: wc.byte_len as usize,
                    // SAFETY: a SEND_WITH_IMM receive carries imm_data.
                    imm: u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }),
                });
            }
            if n > 0 || Instant::now() >= deadline {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for IbvVerbs {
    fn drop(&mut self) {
        for k in 0..self.mrs.len() {
            self.deregister(k as u32);
        }
        // SAFETY: each object was created by us and is destroyed once, in
        // reverse order of creation.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx);
        }
    }
}
