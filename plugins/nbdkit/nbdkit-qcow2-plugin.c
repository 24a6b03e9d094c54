/*
 * nbdkit-qcow2-plugin: serves a qcow2 image over NBD with libqcow2.
 *
 *   nbdkit [-r] ./nbdkit-qcow2-plugin.so [file=]IMAGE [readonly[=true]]
 *          [cache=writeback|writethrough|unsafe|none] [discard=unmap|ignore]
 *          [backing=true|false]
 *
 * The image is checked in get_ready (opened read-only and closed again, so
 * a bad image stops nbdkit before it serves) and opened for serving by the
 * first connection, because only then does nbdkit tell the plugin whether
 * the export is read-only (nbdkit -r): a read-only export, or readonly=true,
 * opens the image read-only and never writes it (no repair of an image
 * left dirty, no bitmap marks). That one handle is shared by every
 * connection (libqcow2 handles are thread-safe), so the thread model is
 * PARALLEL and multi-conn is advertised: a flush on any connection makes the
 * writes of every connection durable. The handle is closed (flushed) in
 * cleanup, after the last connection is gone.
 *
 * Request flags map one to one onto libqcow2's:
 *   NBDKIT_FLAG_FUA       -> QCOW2_REQ_FUA          (pwrite, zero; trim flushes)
 *   NBDKIT_FLAG_MAY_TRIM  -> QCOW2_REQ_MAY_UNMAP    (zero)
 *   NBDKIT_FLAG_FAST_ZERO -> QCOW2_REQ_NO_FALLBACK  (zero; -ENOTSUP -> ENOTSUP)
 *
 * Only include/qcow2.h is used from the engine.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#include <nbdkit-plugin.h>

#include "qcow2.h"

/* Configuration (set by config, read-only afterwards). */
static char *filename;           /* absolute path, malloc'd */
static bool readonly_image;      /* readonly=true: open the file read-only */
static uint32_t cache_flag;      /* QCOW2_OPEN_CACHE_* or 0 (writeback) */
static const char *cache_name = "writeback";
static bool discard_unmap = true;
static bool use_backing = true;
static char *password;           /* passphrase of an encrypted image, malloc'd */

/* The one image handle shared by all connections (set by the first open). */
static Qcow2Image *image;
static bool image_writable;      /* the handle was opened read-write */
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t image_size;
static uint64_t cluster_size;

/* Every connection gets the address of this as its handle. */
static int connection_handle;

/* Reports a libqcow2 failure: libqcow2's message for this thread's failed
 * call (it names the image and the problem), errno for the client. */
static void
report (int ret, const char *what, uint64_t offset, uint64_t count)
{
  nbdkit_error ("qcow2: %s at offset %" PRIu64 " length %" PRIu64 ": %s (%s)",
                what, offset, count, qcow2_last_error (), qcow2_strerror (ret));
  nbdkit_set_error (ret < 0 ? -ret : EIO);
}

static void
qcow2_plugin_unload (void)
{
  if (image) {
    /* cleanup was not called (e.g. nbdkit failed before serving). */
    qcow2_close (image);
    image = NULL;
  }
  free (filename);
  filename = NULL;
  free (password);
  password = NULL;
}

static int
qcow2_plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = nbdkit_realpath (value);
    if (!filename)
      return -1;
  }
  else if (strcmp (key, "readonly") == 0) {
    /* "readonly=" (no value) means true, like a bare flag. */
    int r = value[0] == '\0' ? 1 : nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    readonly_image = r;
  }
  else if (strcmp (key, "cache") == 0) {
    if (strcmp (value, "writeback") == 0)
      cache_flag = 0;
    else if (strcmp (value, "writethrough") == 0)
      cache_flag = QCOW2_OPEN_CACHE_WRITETHROUGH;
    else if (strcmp (value, "unsafe") == 0)
      cache_flag = QCOW2_OPEN_CACHE_UNSAFE;
    else if (strcmp (value, "none") == 0)
      cache_flag = QCOW2_OPEN_CACHE_NONE;
    else {
      nbdkit_error ("qcow2: cache=%s: expected writeback, writethrough, "
                    "unsafe or none", value);
      return -1;
    }
    cache_name = cache_flag == 0 ? "writeback"
      : cache_flag == QCOW2_OPEN_CACHE_WRITETHROUGH ? "writethrough"
      : cache_flag == QCOW2_OPEN_CACHE_UNSAFE ? "unsafe" : "none";
  }
  else if (strcmp (key, "discard") == 0) {
    if (strcmp (value, "unmap") == 0 || strcmp (value, "on") == 0)
      discard_unmap = true;
    else if (strcmp (value, "ignore") == 0 || strcmp (value, "off") == 0)
      discard_unmap = false;
    else {
      nbdkit_error ("qcow2: discard=%s: expected unmap or ignore", value);
      return -1;
    }
  }
  else if (strcmp (key, "password") == 0) {
    /* nbdkit's conventions: password=SECRET, password=- (prompt),
     * password=+FILE, password=-FD. */
    free (password);
    password = NULL;
    if (nbdkit_read_password (value, &password) == -1)
      return -1;
  }
  else if (strcmp (key, "backing") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    use_backing = r;
  }
  else {
    nbdkit_error ("qcow2: unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_config_complete (void)
{
  if (!filename) {
    nbdkit_error ("qcow2: the file=IMAGE parameter is required");
    return -1;
  }
  return 0;
}

#define qcow2_plugin_config_help \
  "[file=]<IMAGE>      (required) the qcow2 image to serve\n" \
  "readonly[=true|false] open the image read-only (default false; nbdkit -r\n" \
  "                    also opens it read-only)\n" \
  "cache=writeback|writethrough|unsafe|none (default writeback)\n" \
  "discard=unmap|ignore (default unmap)\n" \
  "backing=true|false  open the backing chain (default true)\n" \
  "password=<SECRET>|-|+FILE|-FD  passphrase of an encrypted image (LUKS\n" \
  "                    or legacy AES; the data of QEMU's secret object)"

/* Opens the image with `writable`; on success sets *out and the geometry. */
static int
open_image (bool writable, Qcow2Image **out)
{
  uint32_t flags = cache_flag;
  Qcow2Image *img = NULL;
  int ret;

  if (writable)
    flags |= QCOW2_OPEN_RDWR;
  if (discard_unmap)
    flags |= QCOW2_OPEN_UNMAP;
  if (!use_backing)
    flags |= QCOW2_OPEN_NO_BACKING;

  if (password)
    ret = qcow2_open_encrypted (filename, flags, (const uint8_t *) password,
                                strlen (password), &img);
  else
    ret = qcow2_open (filename, flags, &img);
  if (ret < 0) {
    nbdkit_error ("qcow2: %s: cannot open (%s%s, cache=%s): %s", filename,
                  writable ? "read-write" : "read-only",
                  discard_unmap ? ", discard=unmap" : "", cache_name,
                  qcow2_last_error ());
    return -1;
  }
  ret = qcow2_get_virtual_size (img, &image_size);
  if (ret == 0)
    ret = qcow2_get_cluster_size (img, &cluster_size);
  if (ret < 0) {
    nbdkit_error ("qcow2: %s: %s", filename, qcow2_last_error ());
    qcow2_close (img);
    return -1;
  }
  if (image_size > INT64_MAX) {
    nbdkit_error ("qcow2: %s: virtual size %" PRIu64 " too large",
                  filename, image_size);
    qcow2_close (img);
    return -1;
  }
  nbdkit_debug ("qcow2: opened %s: size %" PRIu64 ", cluster %" PRIu64
                ", %s, cache=%s, discard=%s", filename, image_size,
                cluster_size, writable ? "read-write" : "read-only",
                cache_name, discard_unmap ? "unmap" : "ignore");
  *out = img;
  return 0;
}

/* Checks the image opens before any connection (read-only: writes nothing). */
static int
qcow2_plugin_get_ready (void)
{
  Qcow2Image *probe = NULL;

  if (open_image (false, &probe) == -1)
    return -1;
  qcow2_close (probe);
  return 0;
}

/* Flushes and closes the shared handle after the last connection. */
static void
qcow2_plugin_cleanup (void)
{
  if (image) {
    int ret = qcow2_close (image);
    image = NULL;
    if (ret < 0)
      nbdkit_error ("qcow2: %s: final flush on close failed: %s",
                    filename, qcow2_last_error ());
  }
}

/* The first connection opens the shared handle: read-only when the export
 * is (nbdkit -r) or readonly=true was given. */
static void *
qcow2_plugin_open (int readonly)
{
  bool ok = true;

  pthread_mutex_lock (&open_lock);
  if (!image) {
    bool writable = !readonly_image && !readonly;
    Qcow2Image *img = NULL;
    if (open_image (writable, &img) == -1)
      ok = false;
    else {
      image_writable = writable;
      image = img;
    }
  }
  pthread_mutex_unlock (&open_lock);
  return ok ? &connection_handle : NULL;
}

static void
qcow2_plugin_close (void *handle)
{
  (void) handle;    /* the image is shared; it is closed in cleanup */
}

static int64_t
qcow2_plugin_get_size (void *handle)
{
  (void) handle;
  return (int64_t) image_size;
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum,
                         uint32_t *preferred, uint32_t *maximum)
{
  (void) handle;
  *minimum = 1;
  *preferred = cluster_size >= 512 && cluster_size <= 32 * 1024 * 1024
    ? (uint32_t) cluster_size : 4096;
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_plugin_can_write (void *handle)
{
  (void) handle;
  return image_writable;
}

static int
qcow2_plugin_can_flush (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2_plugin_can_trim (void *handle)
{
  (void) handle;
  return image_writable && discard_unmap;
}

static int
qcow2_plugin_can_zero (void *handle)
{
  (void) handle;
  return image_writable;
}

static int
qcow2_plugin_can_fast_zero (void *handle)
{
  (void) handle;
  return image_writable;
}

static int
qcow2_plugin_can_fua (void *handle)
{
  (void) handle;
  return NBDKIT_FUA_NATIVE;
}

static int
qcow2_plugin_can_extents (void *handle)
{
  (void) handle;
  return 1;
}

static int
qcow2_plugin_can_multi_conn (void *handle)
{
  (void) handle;
  return 1;   /* one handle shared by all connections */
}

static int
qcow2_plugin_is_rotational (void *handle)
{
  (void) handle;
  return 0;
}

static int
qcow2_plugin_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
                    uint32_t flags)
{
  int ret;

  (void) handle;
  (void) flags;
  ret = qcow2_read (image, offset, buf, count);
  if (ret < 0) {
    report (ret, "read", offset, count);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_pwrite (void *handle, const void *buf, uint32_t count,
                     uint64_t offset, uint32_t flags)
{
  uint32_t qflags = (flags & NBDKIT_FLAG_FUA) ? QCOW2_REQ_FUA : 0;
  int ret;

  (void) handle;
  ret = qcow2_write (image, offset, buf, count, qflags);
  if (ret < 0) {
    report (ret, "write", offset, count);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_flush (void *handle, uint32_t flags)
{
  int ret;

  (void) handle;
  (void) flags;
  ret = qcow2_flush (image);
  if (ret < 0) {
    report (ret, "flush", 0, image_size);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_trim (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  int ret;

  (void) handle;
  ret = qcow2_discard (image, offset, count);
  if (ret < 0) {
    report (ret, "discard", offset, count);
    return -1;
  }
  /* qcow2_discard has no FUA flag: a flush makes the discard durable. */
  if (flags & NBDKIT_FLAG_FUA) {
    ret = qcow2_flush (image);
    if (ret < 0) {
      report (ret, "flush after discard", offset, count);
      return -1;
    }
  }
  return 0;
}

static int
qcow2_plugin_zero (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags)
{
  uint32_t qflags = 0;
  int ret;

  (void) handle;
  if (flags & NBDKIT_FLAG_MAY_TRIM)
    qflags |= QCOW2_REQ_MAY_UNMAP;
  if (flags & NBDKIT_FLAG_FUA)
    qflags |= QCOW2_REQ_FUA;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    qflags |= QCOW2_REQ_NO_FALLBACK;

  ret = qcow2_write_zeroes (image, offset, count, qflags);
  if (ret == -ENOTSUP && (flags & NBDKIT_FLAG_FAST_ZERO)) {
    /* Not an error worth logging: the client asked for a fast zero and
     * will fall back to writing zeroes itself. */
    nbdkit_debug ("qcow2: %s: fast zero at %" PRIu64 "+%" PRIu32
                  " not possible", filename, offset, count);
    nbdkit_set_error (ENOTSUP);
    return -1;
  }
  if (ret < 0) {
    report (ret, "write zeroes", offset, count);
    return -1;
  }
  return 0;
}

/* NBD extent type of a libqcow2 extent. */
static uint32_t
extent_type (const Qcow2Extent *e)
{
  if (e->flags & QCOW2_EXTENT_DATA)
    return 0;                                       /* data */
  if (!(e->flags & QCOW2_EXTENT_ZERO))
    return 0;                                       /* unknown: data */
  if (!(e->flags & QCOW2_EXTENT_ALLOCATED))
    return NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO; /* unallocated hole */
  return NBDKIT_EXTENT_ZERO;                        /* zero clusters */
}

#define EXTENTS_BATCH 64

static int
qcow2_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                      uint32_t flags, struct nbdkit_extents *extents)
{
  Qcow2Extent buf[EXTENTS_BATCH];
  uint64_t pos = offset, end = offset + count;
  bool req_one = (flags & NBDKIT_FLAG_REQ_ONE) != 0;

  (void) handle;
  while (pos < end) {
    size_t n = 0, i;
    int ret = qcow2_block_status (image, pos, end - pos, buf,
                                  req_one ? 1 : EXTENTS_BATCH, &n);
    if (ret < 0) {
      report (ret, "block status", pos, end - pos);
      return -1;
    }
    if (n == 0) {
      nbdkit_error ("qcow2: %s: block status at offset %" PRIu64
                    " returned no extent", filename, pos);
      nbdkit_set_error (EIO);
      return -1;
    }
    for (i = 0; i < n; i++) {
      if (buf[i].start != pos || buf[i].length == 0 ||
          buf[i].length > end - pos) {
        nbdkit_error ("qcow2: %s: block status at offset %" PRIu64
                      " returned extent %" PRIu64 "+%" PRIu64, filename, pos,
                      buf[i].start, buf[i].length);
        nbdkit_set_error (EIO);
        return -1;
      }
      if (nbdkit_add_extent (extents, buf[i].start, buf[i].length,
                             extent_type (&buf[i])) == -1)
        return -1;
      pos += buf[i].length;
    }
    if (req_one)
      break;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow2",
  .longname          = "nbdkit qcow2 plugin (libqcow2)",
  .version           = "1.0",
  .description       = "Serves a qcow2 image through libqcow2",
  .unload            = qcow2_plugin_unload,
  .config            = qcow2_plugin_config,
  .config_complete   = qcow2_plugin_config_complete,
  .config_help       = qcow2_plugin_config_help,
  .magic_config_key  = "file",
  .get_ready         = qcow2_plugin_get_ready,
  .cleanup           = qcow2_plugin_cleanup,
  .open              = qcow2_plugin_open,
  .close             = qcow2_plugin_close,
  .get_size          = qcow2_plugin_get_size,
  .block_size        = qcow2_plugin_block_size,
  .can_write         = qcow2_plugin_can_write,
  .can_flush         = qcow2_plugin_can_flush,
  .can_trim          = qcow2_plugin_can_trim,
  .can_zero          = qcow2_plugin_can_zero,
  .can_fast_zero     = qcow2_plugin_can_fast_zero,
  .can_fua           = qcow2_plugin_can_fua,
  .can_extents       = qcow2_plugin_can_extents,
  .can_multi_conn    = qcow2_plugin_can_multi_conn,
  .is_rotational     = qcow2_plugin_is_rotational,
  .pread             = qcow2_plugin_pread,
  .pwrite            = qcow2_plugin_pwrite,
  .flush             = qcow2_plugin_flush,
  .trim              = qcow2_plugin_trim,
  .zero              = qcow2_plugin_zero,
  .extents           = qcow2_plugin_extents,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
