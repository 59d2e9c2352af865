// Pictures from the engine: binary messages (see src-tauri/src/frames.rs) drawn with WebGL,
// one canvas per tile. A canvas-2D path stands in where WebGL is unavailable.

export interface Picture {
  kind: "self" | "remote";
  site: string;
  width: number;
  height: number;
  y: Uint8Array;
  u: Uint8Array;
  v: Uint8Array;
}

/** Parses one frame message; `null` if it is malformed (never throws). */
export function parseFrame(buf: ArrayBuffer): Picture | null {
  const b = new Uint8Array(buf);
  if (b.length < 7 || b[0] !== 1) return null;
  const width = b[2] | (b[3] << 8);
  const height = b[4] | (b[5] << 8);
  const idLen = b[6];
  const start = 7 + idLen;
  const ySize = width * height;
  const cSize = (width >> 1) * (height >> 1);
  if (width < 2 || height < 2 || b.length !== start + ySize + 2 * cSize) return null;
  let site = "";
  for (let i = 7; i < start; i++) site += String.fromCharCode(b[i]);
  return {
    kind: b[1] === 0 ? "self" : "remote",
    site,
    width,
    height,
    y: b.subarray(start, start + ySize),
    u: b.subarray(start + ySize, start + ySize + cSize),
    v: b.subarray(start + ySize + cSize, start + ySize + 2 * cSize),
  };
}

const VERTEX = `
attribute vec2 pos;
varying vec2 uv;
void main() {
  uv = vec2((pos.x + 1.0) * 0.5, (1.0 - pos.y) * 0.5);
  gl_Position = vec4(pos, 0.0, 1.0);
}`;

// BT.601 limited range, what openh264 produces.
const FRAGMENT = `
precision mediump float;
varying vec2 uv;
uniform sampler2D ty, tu, tv;
void main() {
  float y = 1.1643 * (texture2D(ty, uv).r - 0.0625);
  float u = texture2D(tu, uv).r - 0.5;
  float v = texture2D(tv, uv).r - 0.5;
  gl_FragColor = vec4(y + 1.596 * v, y - 0.391 * u - 0.813 * v, y + 2.018 * u, 1.0);
}`;

/** Draws I420 pictures into one canvas. */
export class TileRenderer {
  readonly canvas: HTMLCanvasElement;
  frames = 0;
  private gl: WebGLRenderingContext | null = null;
  private tex: WebGLTexture[] = [];
  private ctx2d: CanvasRenderingContext2D | null = null;
  /** Size the textures were allocated at (re-allocated only when it changes). */
  private texSize = "";
  private rgba: ImageData | null = null;

  constructor(canvas: HTMLCanvasElement) {
    this.canvas = canvas;
    const gl = canvas.getContext("webgl", { antialias: false, preserveDrawingBuffer: true });
    if (gl && this.setup(gl)) {
      this.gl = gl;
    } else {
      this.ctx2d = canvas.getContext("2d");
    }
    canvas.dataset.renderer = this.gl ? "webgl" : "2d";
  }

  private setup(gl: WebGLRenderingContext): boolean {
    const shader = (type: number, src: string) => {
      const s = gl.createShader(type)!;
      gl.shaderSource(s, src);
      gl.compileShader(s);
      return gl.getShaderParameter(s, gl.COMPILE_STATUS) ? s : null;
    };
    const vs = shader(gl.VERTEX_SHADER, VERTEX);
    const fs = shader(gl.FRAGMENT_SHADER, FRAGMENT);
    if (!vs || !fs) return false;
    const prog = gl.createProgram()!;
    gl.attachShader(prog, vs);
    gl.attachShader(prog, fs);
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) return false;
    gl.useProgram(prog);
    const buf = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, buf);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    const pos = gl.getAttribLocation(prog, "pos");
    gl.enableVertexAttribArray(pos);
    gl.vertexAttribPointer(pos, 2, gl.FLOAT, false, 0, 0);
    gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
    ["ty", "tu", "tv"].forEach((name, i) => {
      const t = gl.createTexture()!;
      gl.activeTexture(gl.TEXTURE0 + i);
      gl.bindTexture(gl.TEXTURE_2D, t);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
      gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
      gl.uniform1i(gl.getUniformLocation(prog, name), i);
      this.tex.push(t);
    });
    return true;
  }

  draw(p: Picture): void {
    if (this.canvas.width !== p.width || this.canvas.height !== p.height) {
      this.canvas.width = p.width;
      this.canvas.height = p.height;
      this.rgba = null;
    }
    const gl = this.gl;
    if (gl) {
      gl.viewport(0, 0, p.width, p.height);
      const planes: [Uint8Array, number, number][] = [
        [p.y, p.width, p.height],
        [p.u, p.width >> 1, p.height >> 1],
        [p.v, p.width >> 1, p.height >> 1],
      ];
      const size = `${p.width}x${p.height}`;
      const fresh = size !== this.texSize;
      this.texSize = size;
      planes.forEach(([data, w, h], i) => {
        gl.activeTexture(gl.TEXTURE0 + i);
        gl.bindTexture(gl.TEXTURE_2D, this.tex[i]);
        if (fresh) {
          gl.texImage2D(gl.TEXTURE_2D, 0, gl.LUMINANCE, w, h, 0, gl.LUMINANCE, gl.UNSIGNED_BYTE, data);
        } else {
          gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, w, h, gl.LUMINANCE, gl.UNSIGNED_BYTE, data);
        }
      });
      gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
    } else if (this.ctx2d) {
      this.rgba ??= this.ctx2d.createImageData(p.width, p.height);
      i420ToRgba(p, this.rgba.data);
      this.ctx2d.putImageData(this.rgba, 0, 0);
    }
    this.frames++;
    this.canvas.dataset.frames = String(this.frames);
  }
}

/** The canvas-2D path's colour conversion (BT.601 limited range). */
export function i420ToRgba(p: Picture, out: Uint8ClampedArray): void {
  const cw = p.width >> 1;
  for (let j = 0; j < p.height; j++) {
    for (let i = 0; i < p.width; i++) {
      const y = 1.1643 * (p.y[j * p.width + i] - 16);
      const c = (j >> 1) * cw + (i >> 1);
      const u = p.u[c] - 128;
      const v = p.v[c] - 128;
      const o = 4 * (j * p.width + i);
      out[o] = y + 1.596 * v;
      out[o + 1] = y - 0.391 * u - 0.813 * v;
      out[o + 2] = y + 2.018 * u;
      out[o + 3] = 255;
    }
  }
}
